"""Crash consistency of the replay buffer (issue 28): two writers (retries of the same batches, with different
rows) and two compactors run at once and are SIGKILLed at random points, round after round, and some rounds end
in a simulated power loss (the newest sample file cut short after its rename, or the newest compaction record
cut before its merged file was written). Afterwards every row a writer reported written is readable exactly
once, or the buffer reports it lost: its file, or a merged file holding it, is in quarantine/ (the ledger says
which batches a merged file held). No batch has rows of two attempts, and no row appears twice."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from bcoder_ray.buffer import BufferWarning, ReplayBuffer, part_name
from bcoder_ray.buffer.synthetic import synthetic_rows

KEYS = [f"batch-{i:03d}" for i in range(48)]
ROWS = 10
ROUNDS = 12


def batch(key: str, attempt: str):
    """The rows an attempt writes for `key`: each attempt samples different programs (different sample_ids)."""
    seed = int(hashlib.sha256(f"{key}/{attempt}".encode()).hexdigest()[:8], 16)
    t = synthetic_rows(np.random.default_rng(seed), ROWS, mean_tokens=8, max_tokens=20, n_problems=5,
                       start=seed % 100_000)
    # the rows say who wrote them: run_id the batch, actor the attempt
    t = t.set_column(t.schema.get_field_index("actor"), "actor", pa.array([attempt] * ROWS))
    return t.append_column("run_id", pa.array([key] * ROWS))


def quiet() -> None:
    """Children leave the buffer's repair warnings to the final check (they would only fill the test's log)."""
    warnings.simplefilter("ignore", BufferWarning)
    logging.getLogger("bcoder_ray").setLevel(logging.ERROR)


def writer(root: str, journal: str, attempt: str) -> None:
    quiet()
    buf = ReplayBuffer(root, row_group_size=4, validate=False)
    with open(journal, "a") as out:
        for key in KEYS:
            n = buf.append(batch(key, attempt), key)
            if n:
                out.write(f"{key} {attempt} {n}\n")  # reported written: what the actor would tell the driver
                out.flush()


def compactor(root: str, seed: int) -> None:
    quiet()
    buf = ReplayBuffer(root, row_group_size=4, validate=False)
    rng = random.Random(seed)
    while True:
        buf.compact(target_rows=rng.choice([2, 4, 8]) * ROWS)


def power_loss(root: Path, rng: random.Random) -> str | None:
    """Cut the newest sample file short (a lost tail the filesystem should not have lost), or the newest
    compaction record whose merged file does not exist yet (what an unsynced record would look like)."""
    files = sorted((root / "samples").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    if rng.random() < 0.3:
        ledger = root / "_meta" / "compactions"
        records = sorted(ledger.glob("samples--*.json"), key=lambda p: p.stat().st_mtime_ns) if ledger.exists() else []
        newest = files[-1].stat().st_mtime_ns if files else 0
        if records and records[-1].stat().st_mtime_ns > newest:  # no file, its merged one included, came after
            records[-1].write_bytes(records[-1].read_bytes()[:rng.choice([0, 20])])
            return None
    if not files:
        return None
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[:rng.choice([0, len(data) // 2])])
    return files[-1].name


def reported(journals: Path) -> list[tuple[str, str]]:
    """(batch key, attempt) of every batch a writer reported written (a killed writer's last line may be cut)."""
    lines = [line.split() for j in journals.iterdir() for line in j.read_text().splitlines()]
    return [(key, attempt) for key, attempt, n in (x for x in lines if len(x) == 3) if n == str(ROWS)]


def lost_batches(root: Path) -> set[str]:
    """Sample files in quarantine/, and through the ledger every file a quarantined merged file held."""
    quarantined = {p.name for p in (root / "quarantine" / "samples").glob("*")} \
        if (root / "quarantine" / "samples").exists() else set()
    held = {}
    for p in (root / "_meta" / "compactions").glob("samples--*.json"):
        record = json.loads(p.read_bytes())
        held[record["merged"]] = [s[0] for s in record["sources"]]
    lost, todo = set(), list(quarantined)
    while todo:
        name = todo.pop()
        lost.add(name)
        todo += [s for s in held.get(name, []) if s not in lost]
    return lost


def test_killed_writers_and_compactors_and_power_losses_lose_or_duplicate_nothing_unreported(tmp_path):
    root, journals = tmp_path / "buf", tmp_path / "journals"
    journals.mkdir()
    ReplayBuffer(str(root))
    ctx = mp.get_context("forkserver")  # children fork from a clean server that imported the buffer once
    ctx.set_forkserver_preload(["bcoder_ray.buffer"])
    rng = random.Random(int(os.environ.get("BCODER_CRASH_SEED", "28")))
    truncated: set[str] = set()
    attempts = []
    r = 0
    # ROUNDS rounds, more (up to twice as many) while a loaded machine let the writers report too little
    while r < ROUNDS or (len(reported(journals)) < len(KEYS) // 2 and r < 2 * ROUNDS):
        r += 1
        procs = []
        for w in range(2):
            attempts.append(f"w{w}r{r}")
            procs.append(ctx.Process(target=writer, args=(str(root), str(journals / f"{attempts[-1]}.log"),
                                                          attempts[-1])))
        procs += [ctx.Process(target=compactor, args=(str(root), 100 * r + c)) for c in range(2)]
        for p in procs:
            p.start()
        start = time.monotonic()
        for p, at in sorted(((p, rng.uniform(0.05, 0.9)) for p in procs), key=lambda x: x[1]):
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode in (0, -signal.SIGKILL), f"{p.name} ended with {p.exitcode}"
        if rng.random() < 0.25:
            name = power_loss(root, rng)
            if name:
                truncated.add(name)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        buf = ReplayBuffer(str(root))
        buf.compact(target_rows=4 * ROWS)  # finishes whatever a killed compactor left
        table = buf.read(columns=["sample_id", "run_id", "actor"])
    ids = table["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row is readable twice"
    rows_of: dict[tuple[str, str], int] = {}
    for key, attempt in zip(table["run_id"].to_pylist(), table["actor"].to_pylist()):
        rows_of[(key, attempt)] = rows_of.get((key, attempt), 0) + 1
    for key in KEYS:
        written_by = [a for k, a in rows_of if k == key]
        assert len(written_by) <= 1, f"{key}: rows of attempts {written_by}"
    lost = lost_batches(root)
    quarantined = {p.name for p in (root / "quarantine" / "samples").glob("*")} \
        if (root / "quarantine" / "samples").exists() else set()
    assert quarantined <= truncated, "a file nobody damaged was quarantined"
    reports = reported(journals)
    assert len(reports) >= len(KEYS) // 4, "the writers got too little done to test anything"
    for key, attempt in reports:
        got = rows_of.get((key, attempt), 0)
        assert got == ROWS or (got == 0 and part_name(key) in lost), \
            f"{key} ({attempt}): reported written, {got} of {ROWS} rows readable, not reported lost"
        if got:
            assert buf.append(batch(key, "again"), key) == 0  # a retry still writes nothing
    print(f"{len(reports)} batches reported, {len(truncated)} files cut, {len(quarantined)} quarantined, "
          f"{sum(1 for k, a in reports if not rows_of.get((k, a)))} reported batches lost and reported")
