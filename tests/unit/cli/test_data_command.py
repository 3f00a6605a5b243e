"""`lorafleet data prepare` with `data.hub` (a local dataset folder, offline): builds the cache and reports it; a
dataset that cannot be loaded is one `error:` line, exit 2, before anything starts."""

import json

from helpers.cli import JOBS, one_line_error, run_cli
from helpers.hub import dataset_folder


def test_data_prepare_with_hub_data(tmp_path, offline_hub):
    folder = dataset_folder(tmp_path / "tasks", {"train": (JOBS / "data" / "tasks.jsonl").read_text().splitlines()})
    sets = [f"checkpoint.storage={tmp_path / 'store'}", "data.path=null", f"data.hub.name={folder}"]
    args = ["data", "prepare", "tests/jobs/llama.yaml", "--json", *(a for s in sets for a in ("--set", s))]
    proc = run_cli(*args, env=offline_hub, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["records"] == 3000 and report["engine"] == "driver" and not report["reused"]
    assert report["uri"].startswith(str(tmp_path / "store" / "_cache" / "tokenized"))
    assert list((tmp_path / "hf-datasets").rglob("*.arrow"))  # datasets' own cache, where the test put it
    missing = [a.replace(str(folder), str(tmp_path / "nothing")) for a in args]
    line = one_line_error(run_cli(*missing, env=offline_hub, timeout=300))
    assert line == f"error: data.hub.name: no dataset '{tmp_path / 'nothing'}' (Couldn't find any data file at " \
                   f"{tmp_path / 'nothing'}.)"
