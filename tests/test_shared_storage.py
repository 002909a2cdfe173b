"""Shared locations: URIs joined with their query kept, model folders copied from an S3 endpoint (moto's server)
to a node-local folder once, and the `BCODER_REQUIRE_URIS` guard that refuses node-local paths."""

from __future__ import annotations

import os

import pytest
from s3_server import moto_bucket

from bcoder_ray.buffer import ReplayBuffer
from bcoder_ray.util.storage import (COMPLETE_MARKER, NODE_CACHE_ENV, REQUIRE_URIS_ENV, NotSharedError,
                                       is_local_path, join_uri, local_dir, read_text, upload_dir, write_text)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def bucket_uri():
    with moto_bucket() as uri:
        yield uri


def test_join_uri_appends_parts_before_the_query():
    assert join_uri("s3://b/run?endpoint_override=h:1&scheme=http", "train", "/x/") == \
        "s3://b/run/train/x?endpoint_override=h:1&scheme=http"
    assert join_uri("/data/run/", "models") == "/data/run/models"


def test_uris_and_hub_names_are_not_local_paths():
    assert not is_local_path("s3://bucket/ckpt")
    assert not is_local_path("Salesforce/codet5-large-ntp-py")
    assert is_local_path("/abs/ckpt") and is_local_path("./ckpt")


def test_a_model_folder_on_s3_is_copied_to_the_node_once(bucket_uri, tmp_path, monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node"))
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    uri = upload_dir(str(src), join_uri(bucket_uri, "run-a", "models", "ckpt"))
    local = local_dir(uri)
    assert local.startswith(str(tmp_path / "node"))
    assert (open(os.path.join(local, "config.json")).read() == '{"a": 1}'
            and open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\x00\x01" * 1000)
    assert os.path.exists(os.path.join(local, COMPLETE_MARKER))
    monkeypatch.setenv(REQUIRE_URIS_ENV, "1")
    assert local_dir(local) == local  # this node's own copy is not a shared location given by config
    os.remove(os.path.join(local, "config.json"))  # a second call reuses the complete copy, downloads nothing
    assert local_dir(uri) == local and not os.path.exists(os.path.join(local, "config.json"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        local_dir(join_uri(bucket_uri, "run-a", "missing"))
    flat = tmp_path / "flat"  # no sub-folder: the copy's own folder is made first
    flat.mkdir()
    (flat / "config.json").write_text("{}")
    flat_copy = local_dir(upload_dir(str(flat), join_uri(bucket_uri, "run-a", "flat")))
    assert sorted(os.listdir(flat_copy)) == sorted(["config.json", COMPLETE_MARKER])
    write_text(join_uri(bucket_uri, "run-a", "probe.txt"), "hello")
    assert read_text(join_uri(bucket_uri, "run-a", "probe.txt")) == "hello"


def test_require_uris_refuses_node_local_paths_but_not_uris_or_hub_names(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUIRE_URIS_ENV, "1")
    with pytest.raises(NotSharedError, match="buffer.uri.*run.storage_uri"):
        ReplayBuffer(str(tmp_path / "buffer"))
    with pytest.raises(NotSharedError, match="model"):
        local_dir(str(tmp_path))
    assert local_dir("Salesforce/codet5-large-ntp-py") == "Salesforce/codet5-large-ntp-py"
    monkeypatch.delenv(REQUIRE_URIS_ENV)
    assert local_dir(str(tmp_path)) == str(tmp_path)
