"""The `datasets` assumptions of `lorafleet.compat.datasets` (checked on datasets 5.2.0), each on real datasets.

The failure messages name the item, so a `datasets` upgrade that breaks one says which.
"""

from __future__ import annotations

import json
import os

import datasets
import pyarrow as pa

from lorafleet.compat.datasets import dataset_fingerprint, reads_its_files_whole, saved_data_files, saved_splits

RECORDS = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(50)]


def _load_folder(folder):
    return datasets.load_dataset(str(folder), split="train", cache_dir=str(folder.parent / "hf-cache"))


def test_item_1_a_loaded_folders_fingerprint_follows_its_content(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    first = dataset_fingerprint(_load_folder(folder))
    assert dataset_fingerprint(_load_folder(folder)) == first, (
        "datasets: Dataset._fingerprint differs between two loads of unchanged data (lorafleet.compat.datasets item 1)")
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[::-1]))
    os.utime(data, (1, 1))  # another modification time, whatever the clock's resolution
    assert dataset_fingerprint(_load_folder(folder)) != first, (
        "datasets: Dataset._fingerprint did not change with the data (lorafleet.compat.datasets item 1)")


def test_item_2_a_whole_split_has_no_indices_mapping_and_its_files_hold_its_rows(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    ds = _load_folder(folder)
    assert reads_its_files_whole(ds) and not reads_its_files_whole(ds.select([3, 1])), (
        "datasets: Dataset._indices no longer tells a whole split from a selection (lorafleet.compat.datasets item 2)")
    rows = [r for c in ds.cache_files for r in pa.ipc.open_stream(pa.memory_map(c["filename"])).read_all().to_pylist()]
    assert rows == RECORDS


def test_item_3_save_to_disk_lists_its_arrow_files_in_row_order(tmp_path):
    ds = datasets.Dataset.from_list(RECORDS)
    ds.select(range(10, 40)).save_to_disk(str(tmp_path / "one"), num_shards=3)  # a selection is written flat
    state = json.loads((tmp_path / "one" / "state.json").read_text())
    names = saved_data_files(state)
    assert len(names) == 3, f"datasets: state.json's _data_files changed (lorafleet.compat.datasets item 3): {state}"
    rows = [r for n in names for r in pa.ipc.open_stream(pa.memory_map(str(tmp_path / "one" / n))).read_all().to_pylist()]
    assert rows == RECORDS[10:40]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    meta = json.loads((tmp_path / "dict" / "dataset_dict.json").read_text())
    assert sorted(saved_splits(meta)) == ["test", "train"], (
        f"datasets: dataset_dict.json's splits changed (lorafleet.compat.datasets item 3): {meta}")
    assert saved_data_files(json.loads((tmp_path / "dict" / "train" / "state.json").read_text()))
