"""The buffer on an object store: a real S3-compatible HTTP server (moto's server mode) started here, reached
through pyarrow's S3 filesystem, by an explicit filesystem and by an s3:// URI."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from bcoder_ray.buffer.schema import rows_to_table
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows
from bcoder_ray.buffer import BufferError, BufferWarning, ReplayBuffer

BUCKET = "replay"
CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                               **CREDENTIALS)
        fs.create_dir(BUCKET)
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def small(rng, n, **kw):
    return synthetic_rows(rng, n, mean_tokens=10, max_tokens=30, n_problems=10, **kw)


def test_buffer_on_s3(endpoint, monkeypatch):
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", **CREDENTIALS)
    assert fs.type_name == "s3"
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(f"{BUCKET}/run-1", filesystem=fs, row_group_size=32)
    buf.put_prompts(synthetic_prompts(rng, 10, mean_tokens=8, max_tokens=20))
    human = small(rng, 40, source="human")
    assert buf.append(human, "human") == 40
    assert buf.append(human, "human") == 0  # retried batch
    for k in range(5):
        assert buf.append(small(rng, 60, iteration=k), f"gen/{k}") == 60
    written = buf.read().sort_by("sample_id")
    assert written.num_rows == 340

    # another process's view: by URI, credentials from the environment as on a cluster
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    uri = f"s3://{BUCKET}/run-1?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    other = ReplayBuffer(uri)
    assert other.read().sort_by("sample_id").equals(written)
    for b in other.sampler(10, 0.3, seed=0, num_batches=20):
        assert b.num_rows == 10 and sum(b["is_human"].to_pylist()) == 3

    # targets filled later, compaction, the executor's cache
    fp = "ckpt"
    for i, t in enumerate(other.missing_targets(fp)):
        n = pc.list_value_length(t["program_ids"]).to_pylist()
        other.write_targets({"sample_file": t["sample_file"], "row_index": t["row_index"],
                             "sample_id": t["sample_id"], "target_actions": t["program_ids"],
                             "a_ckpt": [[0.0] * k for k in n], "v_phi": [[0.5] * k for k in n]}, fp, f"job/{i}")
    assert not list(other.missing_targets(fp))
    report = buf.compact(target_rows=1000)[0]
    assert report.files_after == 1
    assert ReplayBuffer(uri).read().sort_by("sample_id").equals(written)
    for b in other.sampler(16, 0.5, targets_fingerprint=fp, num_batches=10):
        assert b["target_actions"].to_pylist() == b["program_ids"].to_pylist()
    key = (written["program_hash"][7].as_py(), written["tests_hash"][7].as_py())
    assert buf.lookup_results([key])[key]["outcome"] == written["outcome"][7].as_py()

    # a damaged object is moved aside; the rest stays readable
    with fs.open_output_stream(f"{BUCKET}/run-1/samples/part-broken.parquet") as out:
        out.write(b"PAR1 truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reopened = ReplayBuffer(uri)
    assert any(issubclass(w.category, BufferWarning) and "part-broken" in str(w.message) for w in caught)
    assert fs.get_file_info(f"{BUCKET}/run-1/quarantine/samples/part-broken.parquet").type == pafs.FileType.File
    assert reopened.read().num_rows == 340
    stats = reopened.stats()
    assert stats.samples.rows == 340 and stats.quarantined == 1 and stats.bytes_on_disk["samples"] > 0


def test_writers_and_compactions_exclude_each_other_on_s3(endpoint, monkeypatch):
    """S3's conditional PUT (If-None-Match: *, through boto3): one of two live attempts of a batch publishes;
    compactions hold a lease that a second one waits for, and that a dead holder loses when it expires."""
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", **CREDENTIALS)
    rng = np.random.default_rng(3)
    first = ReplayBuffer(f"{BUCKET}/run-2", filesystem=fs)
    first.put_prompts(synthetic_prompts(rng, 10, mean_tokens=8, max_tokens=20))
    second = ReplayBuffer(f"{BUCKET}/run-2", filesystem=fs)
    monkeypatch.setattr(second.store, "exists", lambda rel: False)  # it checked before the first published
    mine, theirs = small(np.random.default_rng(1), 20), small(np.random.default_rng(2), 20)
    assert first.append(mine, "batch") == 20
    assert second.append(theirs, "batch") == 0  # never replaces the rows the first reported
    assert first.read()["sample_id"].to_pylist() == rows_to_table(mine, "batch")["sample_id"].to_pylist()
    monkeypatch.undo()
    assert second.append(small(np.random.default_rng(4), 20), "other") == 20

    with first.store.lock("compaction"):
        with pytest.raises(BufferError, match="lock 'compaction' held by another process"):
            second.compact(lock_timeout_s=0.5)
    assert second.compact(lock_timeout_s=5)[0].files_after == 1

    dead = first.store.lock("compaction", lease_s=0.5)
    lease = dead.__enter__()  # a compactor that dies holding the lease: it is never released
    assert second.compact(lock_timeout_s=10)[0].files_after == 1  # waits out the lease, then takes the lock
    with pytest.raises(BufferError, match="taken over"):
        lease.check()  # the old holder learns it before publishing anything
