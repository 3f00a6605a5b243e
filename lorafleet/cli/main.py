"""The `lorafleet` command group and its console-script entry point.

This module only assembles the group: each command lives with its kin (`jobs`: submit/validate/spec-doc, `sweep`,
`adapters`: generate/eval/merge, `remote`: status/logs/list/stop/pull/report). stdout carries results (the `--json`
line); progress and errors go to stderr. Exit codes: 0 success, 1 the run failed, 2 bad input (one line naming the
field; nothing was started).
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from lorafleet import __version__
from lorafleet.cli import adapters, api, data, jobs, remote, sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorafleet")
def cli() -> None:
    """Distributed LoRA/QLoRA fine-tuning on Ray."""


for _command in (*jobs.COMMANDS, *sweep.COMMANDS, *adapters.COMMANDS, *remote.COMMANDS, *api.COMMANDS,
                 *data.COMMANDS):
    cli.add_command(_command)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the CLI, turning refusals into one stderr line and an exit code."""
    try:
        cli.main(args=argv, prog_name="lorafleet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
