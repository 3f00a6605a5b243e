"""`lorafleet generate` and `lorafleet merge`: use a trained adapter.

The implementation is imported
lazily, so `--help` stays instant. stdout carries the generated text (or one `--json` line); notes go to stderr.
"""

from __future__ import annotations

import json

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail


verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="Show the libraries' logs, warnings and progress bars."
)


@click.command()
@click.option("--adapter", "adapter_uri", required=True, metavar="URI",
              help="Adapter directory or storage URI (what `lorafleet submit` printed as `adapter:`).")
@click.option("--prompt", required=True, help="The text to continue. For an aLoRA adapter its invocation is appended "
              "when the prompt does not contain it.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--endpoint", default=None, help="Object-store endpoint URL (S3-compatible servers).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line: text, tokens, invocation_appended.")
@verbose_option
def generate(adapter_uri: str, prompt: str, max_new_tokens: int, endpoint, as_json: bool, verbose: bool) -> None:
    """Greedy generation with a trained LoRA or aLoRA adapter on its base model."""
    configure_console(verbose)
    from lorafleet.infer.generate import continue_with_adapter, invocation_of, load_adapter, prompt_ids, stop_ids

    try:
        model, tokenizer = load_adapter(adapter_uri, endpoint=endpoint)
    except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
        fail(f"--adapter: cannot load {adapter_uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    invocation = invocation_of(model)
    ids, appended = prompt_ids(tokenizer, prompt, invocation)
    if appended:
        click.echo(f"lorafleet: appended the aLoRA invocation {tokenizer.decode(invocation)!r} to the prompt", err=True)
    out = continue_with_adapter(model, ids, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer))
    text = tokenizer.decode(out.tokens, skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"text": text, "tokens": out.tokens, "invocation_appended": appended,
                               "alora": invocation is not None}))
    else:
        click.echo(text)


@click.command()
@click.option("--adapter", "adapter_uri", required=True, metavar="URI", help="Adapter directory or storage URI.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Where to save the merged model.")
@click.option("--endpoint", default=None, help="Object-store endpoint URL (S3-compatible servers).")
@verbose_option
def merge(adapter_uri: str, out_dir: str, endpoint, verbose: bool) -> None:
    """Merge a LoRA adapter into its base model (refused for aLoRA adapters)."""
    configure_console(verbose)
    from lorafleet.infer.merge import MergeRefused, merge_adapter
    from lorafleet.runstore.checkpoint import CheckpointError

    try:
        path = merge_adapter(adapter_uri, out_dir, endpoint=endpoint)
    except MergeRefused as exc:
        fail(str(exc))
    except (FileNotFoundError, OSError, CheckpointError) as exc:
        fail(f"--adapter: cannot load {adapter_uri}: {str(exc).splitlines()[0]}")
    click.echo(str(path))


COMMANDS = (generate, merge)
