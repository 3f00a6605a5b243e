"""`lorafleet generate`, `lorafleet eval` and `lorafleet merge`: use and judge a trained adapter.

The implementation is imported
lazily, so `--help` stays instant. stdout carries the generated text (or one `--json` line); notes go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail


verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="Show the libraries' logs, warnings and progress bars."
)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fetch(option: str, adapter_uri: str, endpoint):
    """The adapter's local directory, checked; a missing or damaged adapter is refused in one line."""
    from lorafleet.infer.generate import fetch_adapter

    try:
        return fetch_adapter(adapter_uri, endpoint)
    except (FileNotFoundError, OSError, ValueError, KeyError) as exc:  # CheckpointError is a ValueError
        fail(f"{option}: cannot load {adapter_uri}: {_first_line(exc).removeprefix(f'{adapter_uri}: ')}")


def _load(option: str, adapter_uri: str, directory, as_trained: bool = False):
    from lorafleet.infer.generate import load_adapter

    try:
        return load_adapter(str(directory), as_trained=as_trained)
    except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
        fail(f"{option}: cannot load {adapter_uri}: {_first_line(exc)}")


_SHAPES = {
    "instruction": "--instruction TEXT [--input TEXT]",
    "chat": "--message TEXT (repeatable: user, assistant, user, ...)",
    "text": "--raw TEXT",
}


def _prompt_shape(fmt, raw, instruction, input_text, messages, system) -> str:
    """Which prompt option was given (`raw`, `instruction` or `chat`), refusing one in the wrong shape for an adapter
    trained on `fmt` data (`None`: not recorded, so any shape goes)."""
    given = [name for name, value in (("--raw", raw), ("--instruction", instruction), ("--message", messages))
             if value]
    wanted = f"; this adapter was trained on {fmt} data: give {_SHAPES[fmt]}" if fmt else ""
    if not given:
        fail(f"generate: give a prompt: --instruction, --message or --raw{wanted}")
    if len(given) > 1:
        fail(f"generate: {' and '.join(given)} are exclusive: give one prompt")
    if input_text is not None and not instruction:
        fail("--input: goes with --instruction")
    if system is not None and not messages:
        fail("--system: goes with --message")
    shape = {"--raw": "text", "--instruction": "instruction", "--message": "chat"}[given[0]]
    if fmt and shape != "text" and shape != fmt:
        fail(f"{given[0]}: wrong prompt shape for this adapter: it was trained on {fmt} data: give {_SHAPES[fmt]}"
             + (" (or --raw TEXT for a prompt used as is)" if fmt != "text" else ""))
    if shape == "chat" and len(messages) % 2 == 0:
        fail(f"--message: {len(messages)} messages end with an assistant turn; the messages alternate user, "
             "assistant, user, ... and end with the user's turn the adapter answers")
    return shape


unquantized_option = click.option(
    "--unquantized", is_flag=True,
    help="Load the base model in full precision. Default: as the adapter's job trained on it (its model.dtype and "
    "4-bit quantization, recorded with the adapter), so losses and answers are those of the run's evaluation.",
)


@click.command()
@click.option("--adapter", "adapter_uri", required=True, metavar="URI",
              help="Adapter directory or storage URI (what `lorafleet submit` printed as `adapter:`).")
@click.option("--instruction", default=None, help="For instruction jobs: the instruction, rendered with the job's "
              "template (### Instruction: ... ### Response:).")
@click.option("--input", "input_text", default=None, help="With --instruction: the record's input.")
@click.option("--message", "messages", multiple=True, help="For chat jobs, repeatable: the conversation's turns, "
              "alternating user, assistant, user, ... and ending with the user's turn; rendered with the chat template "
              "and the assistant's turn header.")
@click.option("--system", default=None, help="With --message: a system message before the conversation.")
@click.option("--raw", "--prompt", "raw", default=None, help="A prompt used as is (bos prepended, no template); for "
              "text-format jobs. `--prompt` is the same option.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--endpoint", default=None, help="Object-store endpoint URL (S3-compatible servers).")
@unquantized_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line: text, tokens, invocation_appended.")
@verbose_option
def generate(adapter_uri: str, instruction, input_text, messages, system, raw, max_new_tokens: int, endpoint,
             unquantized: bool, as_json: bool, verbose: bool) -> None:
    """Greedy generation with a trained LoRA or aLoRA adapter on its base model.

    The prompt is rendered with the template of the job that trained the adapter (its checkpoint records the data
    format): `--instruction TEXT [--input TEXT]` for instruction jobs, `--message TEXT` (repeatable) for chat jobs,
    `--raw TEXT` for a prompt used as is. For an aLoRA adapter its invocation is appended when the prompt does not
    contain it.
    """
    configure_console(verbose)
    from lorafleet.infer.generate import continue_with_adapter, invocation_of, prompt_ids, saved_template, stop_ids
    from lorafleet.infer.scoring import chat_prompt_ids, instruction_prompt_ids, with_invocation

    directory = _fetch("--adapter", adapter_uri, endpoint)
    fmt = saved_template(directory).get("format")
    shape = _prompt_shape(fmt, raw, instruction, input_text, messages, system)
    model, tokenizer = _load("--adapter", adapter_uri, directory, as_trained=not unquantized)
    invocation = invocation_of(model)
    if shape == "text":
        if fmt in ("instruction", "chat"):
            click.echo(f"lorafleet: --raw: the prompt is used as is, without the {fmt} template this adapter was "
                       f"trained with ({_SHAPES[fmt]} applies it)", err=True)
        ids, appended = prompt_ids(tokenizer, raw, invocation)
    else:
        if shape == "instruction":
            ids = instruction_prompt_ids(tokenizer, instruction, input_text)
        else:
            turns = [{"role": "system", "content": system}] if system is not None else []
            turns += [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(messages)]
            ids = chat_prompt_ids(tokenizer, turns)
        ids, appended = with_invocation(ids, invocation)
    if appended:
        click.echo(f"lorafleet: appended the aLoRA invocation {tokenizer.decode(invocation)!r} to the prompt", err=True)
    out = continue_with_adapter(model, ids, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer))
    text = tokenizer.decode(out.tokens, skip_special_tokens=True)
    if not text.strip():
        ended = tokenizer.decode(out.tokens[:1]) if out.tokens else ""
        click.echo(f"lorafleet: the adapter generated no text (its first token was {ended!r})", err=True)
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


def _data_problem(problem: str, data_path: str) -> str:
    """A data reader's problem (worded for `data.path`) as one `--data` line that names the file and, for a record of a
    .jsonl file, its line."""
    rest = problem.split(": ", 1)[1] if problem.startswith(("data.path: ", "data.max_length: ")) else problem
    match = re.match(r"record (\d+)(?: \(line (\d+)\))?: (.*)", rest)
    if match:
        number, line, what = match.groups()
        if line is None and data_path.endswith(".jsonl"):
            line = number  # the reader names the line only where it differs from the record number
        rest = f"record {number}" + (f" (line {line})" if line else "") + f": {what}"
    rest = re.sub(r"set data\.format: (\w+)", r"give --format \1", rest)
    return f"--data: {rest}" if data_path in rest else f"--data: {data_path}: {rest}"


@click.command("eval")
@click.argument("adapter_uri", metavar="ADAPTER")
@click.option("--data", "data_path", required=True, metavar="FILE",
              help="Records to evaluate on: .jsonl, .json, .parquet or a saved dataset folder, as data.path accepts.")
@click.option("--format", "fmt", type=click.Choice(["text", "instruction", "chat"]), default=None,
              help="The records' format. Default: the format of the job that trained the adapter.")
@click.option("--max-samples", type=click.IntRange(1), default=None, help="Evaluate the first N records only.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Tokens generated at most per record.")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False), default=None, metavar="OUT.jsonl",
              help="Write one JSON object per evaluated record, in input order: its fields plus `prediction`.")
@click.option("--base-only", is_flag=True, help="Evaluate the base model alone (adapter disabled), same prompts.")
@unquantized_option
@click.option("--endpoint", default=None, help="Object-store endpoint URL (S3-compatible servers).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line: loss, exact_match, contains, samples.")
@verbose_option
def evaluate(adapter_uri: str, data_path: str, fmt, max_samples, max_new_tokens: int, predictions_path, base_only: bool,
             unquantized: bool, endpoint, as_json: bool, verbose: bool) -> None:
    """Loss and generation metrics of an adapter (or of its base model alone) on a file of records.

    The loss is the token-mean cross-entropy of the trained tokens, as training and its held-out evaluation compute
    it. exact_match and contains compare the greedy answer to each record's prompt, rendered with the job's template,
    with its target text (`output` for instruction data, the last assistant turn for chat data).
    """
    configure_console(verbose)
    from lorafleet.data.alora import Invocation
    from lorafleet.data.encode import prepare_samples
    from lorafleet.data.records import load_records
    from lorafleet.infer.generate import invocation_of, saved_template
    from lorafleet.infer.scoring import score_records
    from lorafleet.spec import DataSpec, SpecError
    from lorafleet.train.evaluate import evaluate_loss
    from lorafleet.train.loss import LossModule

    directory = _fetch("ADAPTER", adapter_uri, endpoint)
    template = saved_template(directory)
    fmt = fmt or template.get("format")
    if fmt is None:
        fail("--format: the adapter does not record its job's data format (a plain PEFT adapter, or a checkpoint of "
             "an earlier lorafleet): give --format text, instruction or chat")
    defaults = DataSpec.model_fields
    spec = DataSpec(path=data_path, format=fmt, packing=False,
                    max_length=template.get("max_length", defaults["max_length"].default),
                    train_on_inputs=template.get("train_on_inputs", defaults["train_on_inputs"].default))
    try:
        records = load_records(spec)[:max_samples]
    except SpecError as exc:
        fail(*(_data_problem(p, data_path) for p in exc.problems))
    if predictions_path is not None and not Path(predictions_path).resolve().parent.is_dir():
        fail(f"--predictions: no such directory: {Path(predictions_path).parent}")
    model, tokenizer = _load("ADAPTER", adapter_uri, directory, as_trained=not unquantized)
    invocation = invocation_of(model)
    try:
        samples = prepare_samples(spec, tokenizer, records, invocation=Invocation(invocation) if invocation else None)
    except SpecError as exc:
        fail(*(_data_problem(p, data_path) for p in exc.problems))
    adapter_off = model.disable_adapter() if base_only else contextlib.nullcontext()
    with adapter_off:
        result = evaluate_loss(LossModule(model, fused_loss=False), samples, tokenizer.pad_token_id,
                               device=model.device, micro_batch_size=8)
    scores = score_records(model, tokenizer, records, fmt, max_new_tokens=max_new_tokens, adapter=not base_only)
    if predictions_path is not None:
        with open(predictions_path, "w", encoding="utf-8") as f:
            for record, prediction in zip(records, scores.predictions):
                f.write(json.dumps({**record, "prediction": prediction}, ensure_ascii=False) + "\n")
    summary = {"loss": result.loss if result.tokens else None, "exact_match": scores.metrics.get("exact_match"),
               "contains": scores.metrics.get("contains"), "samples": len(records),
               "loss_samples": result.samples, "generated": scores.samples,
               "empty_predictions": sum(1 for p in scores.predictions if p is not None and not p.strip()),
               "base_only": base_only, "unquantized": unquantized}
    if as_json:
        click.echo(json.dumps(summary))
        return
    what = "base model alone" if base_only else adapter_uri
    click.echo(f"{what} on {data_path} ({len(records)} records, format {fmt})")
    click.echo(f"  loss         {result.loss:.4f} ({result.tokens} target tokens)")
    if scores.samples:
        for name in ("exact_match", "contains"):
            value = scores.metrics[name]
            click.echo(f"  {name:<12} {value:.1%} ({round(value * scores.samples)}/{scores.samples})")
        if summary["empty_predictions"]:
            click.echo(f"  {summary['empty_predictions']} of {scores.samples} answers are empty (the model ended its "
                       "answer at once)")
    else:
        click.echo("  exact_match  - (text records without an aLoRA invocation have no prompt/answer split)")


COMMANDS = (generate, evaluate, merge)
