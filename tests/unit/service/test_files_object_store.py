"""The API's uploaded files on object stores (moto's S3 server and fake-gcs-server, both real servers on 127.0.0.1):
stored by id under the service's storage, read back, downloaded for training, checked, deleted."""

import pytest

from lorafleet.service.files import FileStore, check_chat_file, new_id

GOOD = b'{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n'
BAD = GOOD + b'{"messages": "not a list"}\n'


@pytest.fixture(params=["s3", "gs"])
def store_root(request, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")  # sets AWS_ENDPOINT_URL and credentials
        return f"s3://{server.bucket}/api-files"
    server = request.getfixturevalue("gcs_server")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
    return f"gs://{server.bucket}/api-files"


def test_files_round_trip_on_the_object_store(store_root):
    store = FileStore(store_root)
    good_id, bad_id = new_id("file-"), new_id("file-")
    good_uri, bad_uri = store.put(good_id, GOOD), store.put(bad_id, BAD)
    assert good_uri == f"{store_root}/files/{good_id}.jsonl"
    assert store.exists(good_uri) and store.get(good_uri) == GOOD
    # Training and validation read a local copy: a cached download, byte for byte.
    local = store.local_path(good_uri)
    assert local.read_bytes() == GOOD and store.local_path(good_uri) == local
    assert check_chat_file(local, good_id) == (None, 1)
    problem, _ = check_chat_file(store.local_path(bad_uri), bad_id)
    assert problem.startswith("line 2: ") and "'messages'" in problem
    store.delete(good_uri)
    assert not store.exists(good_uri) and store.exists(bad_uri)
    store.delete(good_uri)  # deleting twice is not an error
