"""The shipped base models (lorafleet/bases.py) and the script that builds `tasks-llama` (scripts/build_demo_base.py)."""

import hashlib
import json

import pytest

from lorafleet.bases import builtin_bases


def test_shipped_manifest_matches_its_weights():
    base = builtin_bases()["tasks-llama"]
    weights = (base.folder / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == base.sha256
    assert len(weights) < 20 * 2**20  # the bound on a shipped base
    manifest = json.loads((base.folder / "manifest.json").read_text())
    assert manifest["recipe"]["script"] == "scripts/build_demo_base.py" and manifest["held_out_exact_match"] > 0.5


def test_pretraining_layouts_are_not_the_default_jobs_template():
    import demo_data  # scripts/ (conftest puts it on sys.path)
    from lorafleet.data.templates import format_instruction_prompt

    records = demo_data.plain_task_records(60, seed=5, styles=tuple(demo_data.PLAIN_STYLES))
    assert {r["style"] for r in records} == set(demo_data.PLAIN_STYLES)
    template_head = format_instruction_prompt("x", "y").split("x")[0]
    assert all(template_head not in r["prompt"] for r in records)
    # Bare answers: the job's prefixes ("Reversed: ", "In capitals: ", ...) are what its adapter has to learn.
    assert any(r["output"].startswith("Reversed: ") for r in demo_data.task_records(60, seed=5))
    assert not any(r["answer"].lstrip().startswith(("Reversed:", "In capitals:", "Sorted", "Initials:", "There are"))
                   for r in records)


@pytest.mark.slow
def test_build_script_is_deterministic_and_resumes_from_stage_one(tmp_path):
    """Two stages in one run give the same bytes as stage 1 alone, then stage 2 from its file (`--stage1`)."""
    import build_demo_base

    common = ["--eval-every", "1000", "--held-out", "2"]
    build_demo_base.main(["--steps", "3", "--layout-steps", "2", "--out", str(tmp_path / "both"), *common])
    build_demo_base.main(["--steps", "3", "--layout-steps", "0", "--out", str(tmp_path / "stage1"), *common])
    build_demo_base.main(["--stage1", str(tmp_path / "stage1"), "--layout-steps", "2", "--out", str(tmp_path / "resumed"),
                          *common])
    both = (tmp_path / "both" / "model.safetensors").read_bytes()
    assert both == (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert both != (tmp_path / "stage1" / "model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "both" / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(both).hexdigest()
    assert manifest["recipe"]["steps"] == 3 and manifest["recipe"]["layout_steps"] == 2
