"""`data.hub` without a hub: a local dataset folder that `datasets.load_dataset` reads by its path (the json builder,
no network), and the settings that keep `datasets` offline and its cache in a throwaway folder."""

from __future__ import annotations

from pathlib import Path


def hub_env(cache: Path) -> dict[str, str]:
    """Environment for a `lorafleet` process that loads hub data: offline, `datasets`' cache under `cache`."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}


def dataset_folder(folder: Path, splits: dict[str, list[str]]) -> Path:
    """A local dataset folder `load_dataset(str(folder))` reads: one `<split>.jsonl` per split (datasets names the
    splits after the files), each holding the given JSON lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(line.rstrip("\n") + "\n" for line in lines))
    return folder


def config_folder(folder: Path, configs: dict[str, list[str]]) -> Path:
    """A local dataset folder with one configuration per entry (a `README.md` whose YAML header lists them, as hub
    repositories do), each a `train` split of the given JSON lines."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["---", "configs:"]
    for name, lines in configs.items():
        (folder / f"{name}.jsonl").write_text("".join(line.rstrip("\n") + "\n" for line in lines))
        header += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {name}.jsonl"]
    (folder / "README.md").write_text("\n".join([*header, "---", ""]))
    return folder
