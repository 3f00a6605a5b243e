"""The remote entrypoint's handling of a shipped spec's data paths."""

from __future__ import annotations

from lorafleet.remote.entrypoint import _resolve_data


def test_shipped_data_paths_resolve_in_the_working_dir_and_uris_stay(tmp_path):
    raw = {"data": {"path": "data/shards", "eval_path": "s3://bucket/held-out/"}}
    _resolve_data(raw, tmp_path)
    assert raw["data"] == {"path": str(tmp_path / "data" / "shards"), "eval_path": "s3://bucket/held-out/"}
    raw = {"data": {"path": "gs://bucket/data/part-*.jsonl", "eval_path": "/abs/held-out.jsonl"}}
    _resolve_data(raw, tmp_path)
    assert raw["data"] == {"path": "gs://bucket/data/part-*.jsonl", "eval_path": "/abs/held-out.jsonl"}
