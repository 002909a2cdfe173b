"""Nothing lost, nothing twice, under SIGKILL in `run.mode: async` (issue 30, item 4), on ci_tiny as a separate
driver process (`experiments/run.py`, as test_e2e runs it):

1. the driver's whole session (the driver and the Ray it started) is SIGKILLed three times, each at a seeded
   random moment after the run made progress since it (re)started, and resumed with `--resume` after each; the
   second time the driver is first stopped (SIGSTOP) until a task's rows land that it could not record: the
   resumed run must count that task from the buffer, not sample it again;
2. in the last resumed run, a rollout actor's process is SIGKILLed in the middle of a task (Ray restarts it and
   retries the task under its key), and a learner worker's process in the middle of a chunk of steps once a
   resumable checkpoint is recorded (`stages.<stage>.checkpoint_every`: the group is built again and continues);
3. the finished run is checked against what was appended: every task recorded as landed has exactly one file in
   the buffer and each file is a recorded task's, no sample_id twice, each task's rows are exactly its problems'
   m samples of its round, the programs counted equal the rows, every stage ended at its step count, and the
   learner's failures are the kills of it.

The processes are found in the driver's session by their Ray titles (`ray::PolicyWorker.rollout`,
`ray::LearnerWorker.train`): only processes this test started are killed."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from driver_process import kill_session, start_driver
from test_async import train_problem_ids

pytestmark = pytest.mark.long

OVERRIDES = ["--run.mode", "async", "--run.iterations", "2", "--run.publish_every", "2",
             "--run.budget_programs", "320", "--run.tensorboard", "false", "--evaluation.warm_start_baseline", "false",
             "--stages.phi.checkpoint_every", "2", "--stages.theta.steps", "8", "--stages.theta.checkpoint_every", "2"]
DRIVER_KILLS = 3
FROZEN_KILL = 1  # the driver kill that waits, the driver stopped, for rows it cannot record
DEADLINE_S = 1800  # a guard against a hang, not a timing check (minutes on an idle 2-core machine)


def state_of(run_dir: Path) -> dict:
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def progress(state: dict) -> int:
    """Grows with whatever the run records: landed tasks, finished rounds and stages, resumable steps."""
    p = state.get("in_progress") or {}
    return (len(state.get("rollout_done", [])) + 100 * state.get("completed_iterations", 0) + len(p.get("stages", {}))
            + sum(r["step"] for r in p.get("resumable", {}).values()))


def landed_unrecorded(run_dir: Path) -> list[str]:
    """Keys of the rollout tasks whose rows are in the buffer but not recorded as landed in state.json."""
    from bcoder_ray.buffer import part_name

    state = state_of(run_dir)
    present = {p.name for p in (run_dir / "buffer" / "samples").glob("part-*.parquet")}
    keys = (f"{state['run_id']}-a{rnd}-t{k:04d}" for rnd in range(20) for k in range(20))
    return [key for key in keys if part_name(key) in present and key not in state["rollout_done"]]


def session_process(proc: subprocess.Popen, title: str):
    """A process of the driver's session whose Ray title starts with `title` (None: none now)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and " ".join(p.cmdline()).startswith(title):
                return p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return None


def check_alive(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.poll() is not None:
        pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")


def test_sigkills_of_the_driver_an_actor_and_a_learner_lose_no_row_and_write_none_twice(tmp_path):
    from bcoder_ray.buffer import part_name
    from bcoder_ray.loop.rollout import iteration_slice, make_tasks
    from bcoder_ray.loop.run_folder import load_run

    rng = random.Random(30)
    run_dir, deadline = tmp_path / "run", time.time() + DEADLINE_S
    first = ["--config", "ci_tiny", "--run-dir", str(run_dir), "--model.warm_start.cache_dir", str(tmp_path / "warm"),
             *OVERRIDES]
    kills: collections.Counter = collections.Counter()
    logs, unrecorded = [], []

    # 1. the driver, killed at random moments, resumed after each
    for k in range(DRIVER_KILLS):
        before = progress(state_of(run_dir))
        logs.append(tmp_path / f"driver-{k}.log")
        proc = start_driver(first if k == 0 else ["--resume", str(run_dir)], logs[-1])
        try:
            while progress(state_of(run_dir)) <= before or not state_of(run_dir).get("rollout_done"):
                check_alive(proc, logs[-1], f"driver kill {k + 1}")
                assert time.time() < deadline, "no progress before the deadline"
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 2.0))
            check_alive(proc, logs[-1], f"driver kill {k + 1}")
            if k == FROZEN_KILL:  # the actor's task in flight lands; the stopped driver cannot record it
                os.kill(proc.pid, signal.SIGSTOP)
                stopped_until = time.time() + 120
                while not unrecorded and time.time() < stopped_until:
                    unrecorded = landed_unrecorded(run_dir)
                    time.sleep(0.2)
                assert unrecorded, "no rollout task landed in 120 s while the driver was stopped"
        finally:
            kill_session(proc)
        kills["driver"] += 1

    # 2. resumed once more: a rollout actor killed mid-task, a learner worker mid-chunk after a resumable checkpoint
    logs.append(tmp_path / "driver-last.log")
    proc = start_driver(["--resume", str(run_dir)], logs[-1])
    killed_stage = None
    try:
        while proc.poll() is None and (not kills["actor"] or not kills["learner"]):
            assert time.time() < deadline, "the kills did not happen before the deadline"
            if not kills["actor"] and (p := session_process(proc, "ray::PolicyWorker.rollout")) is not None:
                time.sleep(rng.uniform(0.0, 0.5))
                if " ".join(p.cmdline()).startswith("ray::PolicyWorker.rollout"):  # still in its task
                    os.kill(p.pid, signal.SIGKILL)
                    kills["actor"] += 1
            resumable = (state_of(run_dir).get("in_progress") or {}).get("resumable") or {}
            if not kills["learner"] and resumable and \
                    (p := session_process(proc, "ray::LearnerWorker.train")) is not None:
                os.kill(p.pid, signal.SIGKILL)
                kills["learner"] += 1
                killed_stage = next(iter(resumable))
            time.sleep(0.1)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        kill_session(proc)
    log = logs[-1].read_text()
    assert rc == 0, log[-4000:]
    assert kills == {"driver": DRIVER_KILLS, "actor": 1, "learner": 1}, (kills, log[-4000:])

    # 3. the buffer against what was appended
    loaded = load_run(run_dir)
    st, cfg = loaded.state, loaded.cfg
    assert st.completed_iterations == cfg.run.iterations and st.in_progress is None
    landed = st.rollout_done
    assert len(set(landed)) == len(landed), "a task recorded as landed twice"
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    files = {f.name: pq.read_table(f, columns=["sample_id", "source", "iteration", "problem_id"]).to_pylist()
             for f in (run_dir / "buffer" / "samples").glob("*.parquet")}
    generated_files = {n for n, rows in files.items() if any(r["source"] == "generated" for r in rows)}
    assert generated_files == {part_name(k) for k in landed}, "a landed task without its file, or a file of none"
    everything = ds.dataset(str(run_dir / "buffer" / "samples"), format="parquet").to_table(columns=["sample_id"])
    ids = everything["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == sum(len(rows) for rows in files.values()), "a row twice"
    # each landed task's file holds exactly m samples of each of its problems, of its round
    train, m = train_problem_ids(run_dir), cfg.rollout.samples_per_problem
    tasks = {}
    for rnd in range(max(int(k.rsplit("-a", 1)[1].split("-")[0]) for k in landed) + 1):
        indices = iteration_slice(len(train), cfg.rollout.problems_per_iteration, rnd)
        tasks.update({t.key: t for t in make_tasks(f"{st.run_id}-a{rnd}", indices, cfg.rollout.problems_per_task,
                                                   rnd, cfg.run.seed)})
    rows_compared = 0
    for key in landed:
        rows = files[part_name(key)]
        want = collections.Counter({(tasks[key].iteration, train[i]): m for i in tasks[key].problem_indices})
        got = collections.Counter((r["iteration"], r["problem_id"]) for r in rows)
        # the budget may cut the last task handed out: its first problems, m samples each
        assert got == want or (set(got) < set(want) and set(got.values()) == {m}), key
        rows_compared += len(rows)
    assert st.programs_sampled == rows_compared == sum(len(files[n]) for n in generated_files)

    # the learner: every stage ended at its steps; the one failure is the kill, and that stage continued
    stages = [(r["iteration"], label, s) for r in st.iterations for label, s in r["stages"].items()]
    for _, label, s in stages:
        assert s.get("skipped") or s["step"] == cfg.stage(label).steps, (label, s)
    failed = [(it, label, s) for it, label, s in stages if s.get("learner_failures")]
    assert [s["learner_failures"] for *_, s in failed] == [1], failed
    # the tasks whose rows landed while the driver was stopped: counted from the buffer after the resume
    later = "".join(p.read_text() for p in logs[FROZEN_KILL + 1:])
    for key in unrecorded:
        assert key in landed and re.search(rf"rollout task {re.escape(key)}: its \d+ rows had landed before the "
                                           rf"interruption; counted, not sampled again", later), key
    reused = sum(p.read_text().count("counted, not sampled again") for p in logs)
    print(f"kills {dict(kills)}; {len(unrecorded)} task(s) landed while the driver was stopped; {len(landed)} "
          f"tasks, {rows_compared} generated rows and {len(ids)} rows in all compared; {reused} redone tasks "
          f"counted from the buffer; learner killed in stage {killed_stage}, "
          f"failed stage {failed[0][1]} of round {failed[0][0]} resumed from step {failed[0][2]['resumed_from_step']}")
