"""`datasets` internals lorafleet relies on to read a saved or loaded dataset's Arrow files through the tokenized cache.

Checked on: datasets 5.2.0 (installed; `tests/unit/compat/test_compat_datasets.py` checks each item on real datasets).

`datasets` has no public API for "which Arrow files hold this split's rows, in order" (`cache_files` lists the files,
not whether they hold exactly the dataset's rows) nor for "what identifies this data": lorafleet reads both from
private state.

Private things touched:

1. `Dataset._fingerprint`: the hash `datasets` derives from a loaded dataset's builder config, data files and
   revision (for a local folder, from the files' paths and modification times). Part of `data.hub`'s fingerprint
   ([`dataset_fingerprint`]), so the cache key and the resume check change when the data does. Gone when `datasets`
   exposes the fingerprint publicly.
2. `Dataset._indices`: an indices mapping over the Arrow table (after `select`, `shuffle`, a sliced split); with one,
   the files hold other rows than the dataset ([`reads_its_files_whole`]). A contiguous selection slices the table
   instead (no mapping); `lorafleet.data.hub` catches that by counting the files' rows.
3. The `save_to_disk` layout: `state.json`'s `_data_files` (a list of `{"filename": ...}`, in row order) and
   `dataset_dict.json`'s `splits` ([`saved_data_files`], [`saved_splits`]); `save_to_disk` writes the selected rows
   themselves, never an indices mapping.
"""

from __future__ import annotations

from typing import Any


def dataset_fingerprint(ds: Any) -> str:
    """The fingerprint `datasets` keeps for a loaded `Dataset` (item 1).

    Example:

    ```python
    >>> import datasets
    >>> len(dataset_fingerprint(datasets.Dataset.from_list([{"text": "hi"}])))
    16
    ```
    """
    return ds._fingerprint


def reads_its_files_whole(ds: Any) -> bool:
    """Whether `ds`'s rows are its Arrow files' rows, in order: no indices mapping over them (item 2).

    Example:

    ```python
    >>> import datasets
    >>> ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    >>> reads_its_files_whole(ds), reads_its_files_whole(ds.select([1, 0]))  # a contiguous select stays a slice
    (True, False)
    ```
    """
    return ds._indices is None


def saved_data_files(state: dict[str, Any]) -> list[str]:
    """The Arrow file names a saved `Dataset`'s `state.json` lists, in row order (item 3); empty if it lists none.

    Example:

    ```python
    >>> saved_data_files({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    ['data-00000-of-00001.arrow']
    ```
    """
    return [f["filename"] for f in state.get("_data_files") or [] if isinstance(f, dict) and f.get("filename")]


def saved_splits(meta: dict[str, Any]) -> list[str]:
    """The split names a saved `DatasetDict`'s `dataset_dict.json` lists (item 3), each a sub-folder.

    Example:

    ```python
    >>> saved_splits({"splits": ["train", "test"]})
    ['train', 'test']
    ```
    """
    return list(meta.get("splits") or [])
