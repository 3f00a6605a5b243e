"""One test per Ray Train assumption of `lorafleet.compat.ray` (checked on ray 2.60.0), without a cluster: a
`StorageContext` is built directly on a temporary folder, as Ray's own doctests build one.

Each failure message names the assumption, so a Ray upgrade that breaks one says which workaround to revisit.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import ray.train

from lorafleet.compat import ray as compat

CHECKED = "lorafleet.compat.ray item {}, checked 2.60.0"


@pytest.fixture
def storage(tmp_path):
    try:
        from ray.train.v2._internal.execution.storage import StorageContext
    except ImportError as exc:
        raise AssertionError(
            f"ray: ray.train.v2._internal.execution.storage.StorageContext moved ({CHECKED.format(1)})"
        ) from exc
    return StorageContext(storage_path=str(tmp_path / "runs"), experiment_dir_name="run")


def test_get_storage_returns_the_workers_storage_context(storage, monkeypatch):
    from ray.train.v2._internal.execution import context as internal
    from ray.train.v2.api.context import DistributedTrainContext

    fields = [f.name for f in dataclasses.fields(internal.TrainContext)]
    assert "storage_context" in fields and internal.TrainContext.get_storage(
        SimpleNamespace(storage_context=storage)
    ) is storage, (
        f"ray: the worker's internal TrainContext no longer hands out its `storage_context` from get_storage() "
        f"({CHECKED.format(1)}): fields {fields}"
    )
    # The public context of a worker delegates to the internal one; lorafleet reaches it through get_context().
    monkeypatch.setattr(internal, "_train_context", SimpleNamespace(get_storage=lambda: storage))
    monkeypatch.setattr(ray.train, "get_context", DistributedTrainContext)
    assert compat.current_storage() is storage, (
        f"ray: ray.train.get_context().get_storage() no longer returns the worker's StorageContext "
        f"({CHECKED.format(1)})"
    )


def test_storage_filesystem_is_the_runs_pyarrow_filesystem(storage):
    from pyarrow import fs

    assert isinstance(getattr(storage, "storage_filesystem", None), fs.FileSystem), (
        f"ray: StorageContext.storage_filesystem is gone or not a pyarrow filesystem ({CHECKED.format(2)})"
    )
    assert compat.storage_filesystem(storage).type_name == "local"


def test_build_checkpoint_path_from_name_is_in_the_run_folder(storage):
    assert hasattr(storage, "build_checkpoint_path_from_name"), (
        f"ray: StorageContext.build_checkpoint_path_from_name is gone ({CHECKED.format(2)})"
    )
    path = compat.checkpoint_fs_path(storage, "checkpoint_000001")
    assert path == f"{storage.storage_fs_path}/run/checkpoint_000001", (
        f"ray: StorageContext.build_checkpoint_path_from_name no longer gives <storage>/<run>/<name> "
        f"({CHECKED.format(2)}): {path}"
    )


def test_persist_current_checkpoint_copies_the_files(storage, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"\x01" * 100)
    assert hasattr(storage, "persist_current_checkpoint"), (
        f"ray: StorageContext.persist_current_checkpoint is gone ({CHECKED.format(2)})"
    )
    persisted = compat.persist_checkpoint(storage, ray.train.Checkpoint(str(local)), "checkpoint_000001")
    assert persisted.path == compat.checkpoint_fs_path(storage, "checkpoint_000001"), (
        f"ray: StorageContext.persist_current_checkpoint stored elsewhere than build_checkpoint_path_from_name "
        f"({CHECKED.format(2)}): {persisted.path}"
    )
    stored = persisted.filesystem.get_file_info(f"{persisted.path}/adapter_model.safetensors")
    assert stored.size == 100, f"ray: persist_current_checkpoint did not copy the files ({CHECKED.format(2)})"


def test_health_check_interval_setting_reaches_the_controller():
    try:
        from ray.train.v2._internal import constants
    except ImportError as exc:
        raise AssertionError(f"ray: ray.train.v2._internal.constants moved ({CHECKED.format(3)})") from exc
    name = getattr(constants, "HEALTH_CHECK_INTERVAL_S_ENV_VAR", None)
    assert name in compat.TRAIN_ENV, (
        f"ray: the controller's poll interval is no longer set by {sorted(compat.TRAIN_ENV)} ({CHECKED.format(3)}): "
        f"{name}"
    )
    assert name in constants.ENV_VARS_TO_PROPAGATE, (
        f"ray: {name} is no longer passed from the driver to the controller ({CHECKED.format(3)})"
    )
    # The setting only helps while Ray polls less often than lorafleet asks for.
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S > float(compat.TRAIN_ENV[name]), (
        f"ray: the default poll interval is now {constants.DEFAULT_HEALTH_CHECK_INTERVAL_S} s; lorafleet's "
        f"{name}={compat.TRAIN_ENV[name]} would slow it down ({CHECKED.format(3)})"
    )
