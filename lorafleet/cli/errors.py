"""The CLI's one rule for bad input: one `error: ...` line per problem on stderr, exit code 2, no traceback, nothing
started."""

from __future__ import annotations

from typing import Any, NoReturn

import click


class UsageError(click.ClickException):
    """Bad input, worded as one line per problem, each naming what is wrong and where (`field: problem`).

    Click's own handler prints it, so it behaves the same under `lorafleet`, `python -m lorafleet.cli` and a test's
    `CliRunner`.

    Args:
        *problems (`str`):
            One line each; `message` is them joined by newlines.

    Example:

    ```python
    >>> err = UsageError("lora.r: must be positive", "data.path: no such file")
    >>> err.exit_code, err.problems
    (2, ['lora.r: must be positive', 'data.path: no such file'])
    ```
    """

    exit_code = 2

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def show(self, file: Any = None) -> None:
        for problem in self.problems:
            click.echo(f"error: {problem}", err=True)


def fail(*problems: str) -> NoReturn:
    """Refuse the command: one `error: <problem>` line per problem on stderr, exit code 2.

    Args:
        *problems (`str`): One line each, naming what is wrong and where.

    Example:

    ```python
    >>> try:
    ...     fail("--wait: needs a Jobs API address")
    ... except UsageError as exc:
    ...     print(exc.message)
    --wait: needs a Jobs API address
    ```
    """
    raise UsageError(*problems)
