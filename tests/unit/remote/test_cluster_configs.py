"""The cluster configs in cluster/ parse, and every lorafleet command, job spec and file they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers.cli import REPO

CLUSTER = REPO / "cluster"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _cli_commands() -> set[str]:
    from lorafleet.cli.main import cli

    return set(cli.commands)


def _lorafleet_invocations(text: str) -> list[str]:
    """Subcommands of every `lorafleet X` invocation in a file (commands and comments alike: both are instructions)."""
    # A command starts a line (after a comment mark, a list dash, `entrypoint:` or VAR=value prefixes); prose that
    # mentions lorafleet mid-sentence is not an invocation.
    prefix = r"^[ \t]*(?:#[ \t]*)?(?:-[ \t]+)?(?:entrypoint:[ \t]*)?(?:[A-Z_]+=\S+[ \t]+)*"
    return re.findall(prefix + r"lorafleet[ \t]+([a-z][a-z-]+)", text, flags=re.MULTILINE)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_and_names_real_commands(path: Path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    commands = _cli_commands()
    invoked = _lorafleet_invocations(path.read_text())
    unknown = sorted(set(invoked) - commands)
    assert not unknown, f"{path.name} names lorafleet commands that do not exist: {unknown}"


def test_aws_launcher_config():
    (config,) = _docs(CLUSTER / "aws-gpu.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in config["available_node_types"].values())
    for remote, local in config.get("file_mounts", {}).items():
        assert (REPO / local).exists(), f"file_mounts source {local} does not exist"
    starts = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in starts and "--dashboard-host" in starts


def test_kuberay_manifests():
    cluster = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert [d["kind"] for d in cluster] == ["RayCluster"]
    assert cluster[0]["apiVersion"] == "ray.io/v1"
    docs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "RayJob"}
    job = kinds["RayJob"]
    # The entrypoint is a real lorafleet command reading the spec the ConfigMap mounts at /config.
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "lorafleet" and entry[1] in _cli_commands()
    spec_file = entry[2]
    mounts = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    mount = next(m for m in mounts if spec_file.startswith(m["mountPath"] + "/"))
    assert Path(spec_file).name in kinds["ConfigMap"]["data"], "the entrypoint's spec is not in the ConfigMap"
    assert mount["name"] in {v["name"] for v in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}


def test_rayjob_spec_is_valid(tmp_path):
    """The ConfigMap's job spec validates, with the image's /app pointing at this repo (cluster/Dockerfile copies it)."""
    from lorafleet.spec import load_spec

    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "rayjob.yaml")}
    raw = yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"])
    raw["data"]["path"] = raw["data"]["path"].replace("/app/", f"{REPO}/")
    spec = load_spec(raw=raw)
    assert spec.scaling.resources_per_worker.get("GPU") == 1
    assert spec.storage_uri.startswith("s3://")


def test_dockerfile_copies_existing_files():
    lines = [l.split() for l in (CLUSTER / "Dockerfile").read_text().splitlines() if l.startswith("COPY ")]
    assert lines
    for parts in lines:
        sources = [s for s in parts[1:-1] if not s.startswith("--")]
        for source in sources:
            if any(ch in source for ch in "*?["):
                continue  # optional files (globs) may match nothing
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert any("jobs" in parts for parts in lines), "the image must contain jobs/ (the RayJob's data path)"
