"""The CI-sized loop on a two-node local Ray cluster, with the buffer, Ray Train's storage and every checkpoint on
an S3 endpoint (moto's server), against the same run on one node with local paths; and stages that continue
from their last checkpoint after a learner worker is killed, and after the driver is killed.

Both nodes share this machine's disk, so the second node, where all the work runs (the head has no CPUs: only
zero-CPU actors such as Ray Train's controller land there), is started with `BCODER_REQUIRE_URIS=1` and a node
cache of its own: a read of a plain path given as a shared location raises there, and every model it loads is
a copy it downloaded. Marked `cluster`: the plain test command deselects it; `.ci/run` runs it as a second step
(`python -m pytest -m cluster`).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from driver_process import REPO, kill_session, start_driver
from s3_server import moto_bucket

pytestmark = pytest.mark.cluster

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
RUN_ID = "cluster0test"  # every run here draws the same rollout seeds (run.id)
# ci_tiny with a stage θ long enough to be interrupted between its resumable checkpoints
OVERRIDES = ["--run.id", RUN_ID, "--stages.theta.steps", "120",
            "--stages.theta.checkpoint_every", "30", "--stages.theta.report_every", "30"]
THETA_CHECKPOINT = "theta-iter0-*/step-000030"  # the first resumable checkpoint of iteration 0's stage θ


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def s3_uri():
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # inherited by the cluster's raylets, hence by every worker
    try:
        with moto_bucket() as uri:
            yield uri
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def single_node_run(workdir, s3_uri) -> Path:
    """The reference: `experiments/run.py` on one node (its own local Ray), every location a local path."""
    run_dir = workdir / "single"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = workdir / "single.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--config", "ci_tiny", *OVERRIDES,
                               "--run-dir", str(run_dir), "--model.warm_start.cache_dir", str(workdir / "warm")],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def two_nodes(workdir, s3_uri):
    """A head with no CPUs and a worker node of 2 CPUs that only reads shared locations."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from bcoder_ray.util.storage import NODE_CACHE_ENV, REQUIRE_URIS_ENV

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * 1024 ** 2,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, object_store_memory=200 * 1024 ** 2,
                     env_vars={REQUIRE_URIS_ENV: "1", NODE_CACHE_ENV: str(workdir / "node2-cache")})
    ray.init(address=cluster.address,
             runtime_env={"worker_process_setup_hook": "bcoder_ray.util.quiet.quiet_ray_logs",
                          "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def learner_worker_pids() -> list[int]:
    """Ray Train's worker processes on this machine (Ray titles an actor's process `ray::<class>...`)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker"):
            pids.append(p.pid)
    return sorted(pids)


def kill_a_learner_after_a_checkpoint(train_uri: str, killed: list, timeout_s: float = 900) -> None:
    """SIGKILL one Ray Train worker of iteration 0's stage θ once its first resumable checkpoint is on the
    storage and before its final one (the stage must then continue from a checkpoint, on a new worker group).
    Appends the pid killed to `killed`, or the exception that stopped the search."""
    import psutil
    import pyarrow.fs as pafs

    from bcoder_ray.util.storage import resolve

    try:
        fs, root = resolve(train_uri)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            time.sleep(0.2)
            runs = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                    if i.base_name.startswith("theta-iter0-")]
            for run_path in runs:
                first, final = (fs.get_file_info(f"{run_path}/{d}").type for d in ("step-000030", "final"))
                if final != pafs.FileType.NotFound:
                    killed.append(RuntimeError(f"{run_path} finished before a worker was killed"))
                    return
                pids = learner_worker_pids()
                if first == pafs.FileType.Directory and pids:
                    psutil.Process(pids[0]).kill()
                    killed.append(pids[0])
                    return
    except Exception as e:  # noqa: BLE001 - reported by the test's assertion
        killed.append(e)


def stage_metrics(record: dict, stage: str) -> dict:
    return {k: v for k, v in record["stages"][stage].items()
            if k in ("loss", "l_v", "l_q", "l_adv", "l_ce", "td_error", "grad_norm", "step")}


def assert_same_weights(path_a: str, path_b: str) -> None:
    """The two LM folders hold the same weights within float32 rounding (the same operations on the same batches;
    only the order of a reduction across ranks may differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bcoder_ray.util.storage import local_dir

    a = AutoModelForCausalLM.from_pretrained(local_dir(path_a)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(local_dir(path_b)).state_dict()
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], msg=name)  # float32 defaults: rtol 1.3e-6, atol 1e-5


def reads_of(run_dir: Path, stage_run: str) -> dict:
    files = sorted(glob.glob(str(run_dir / "reads" / stage_run / "reads-rank*.json")))
    assert files, (run_dir, stage_run)
    return {Path(f).name: json.loads(Path(f).read_text()) for f in files}


def read_rows(uri: str) -> list[tuple]:
    from bcoder_ray.buffer import ReplayBuffer

    table = ReplayBuffer(uri).read(columns=["sample_id", "source", "iteration", "policy_version", "reward",
                                            "program"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names)))


def test_the_loop_on_two_nodes_and_s3_equals_the_single_node_run(single_node_run, two_nodes, workdir, s3_uri):
    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.util.storage import NODE_CACHE_ENV, is_uri, join_uri

    os.environ[NODE_CACHE_ENV] = str(workdir / "driver-cache")  # the driver's node downloads its own copies
    run_dir = workdir / "two-nodes"
    plan = prepare_run(config="ci_tiny", run_dir=str(run_dir),
                       overrides=[*OVERRIDES, "--run.storage_uri", s3_uri,
                                  "--model.warm_start.cache_dir", str(workdir / "warm")])
    killed: list = []
    killer = threading.Thread(target=kill_a_learner_after_a_checkpoint, daemon=True,
                              args=(join_uri(s3_uri, run_dir.name, "train"), killed))
    killer.start()
    state = run(plan).state
    killer.join(timeout=5)
    assert killed and isinstance(killed[0], int), f"no learner worker was killed inside iteration 0's θ: {killed}"
    single = json.loads((single_node_run / "state.json").read_text())

    # every location the workers read is on the S3 endpoint
    storage = join_uri(s3_uri, run_dir.name)
    assert state.theta_ckpt == join_uri(storage, "models", "theta_ckpt")
    for key in ("phi", "theta"):
        checkpoint = state.algorithm[key]
        assert is_uri(checkpoint) and checkpoint.startswith(f"s3://shared/{run_dir.name}/train/"), (key, checkpoint)
    assert not (run_dir / "buffer").exists() and not (run_dir / "train").exists()
    # the driver wrote what the learners sent: TensorBoard per stage, the read counts
    for stage in ("phi", "theta"):
        assert list((run_dir / "tensorboard" / stage).glob("events.out.tfevents*")), stage
    assert sorted(p.parent.name.split("-")[0] for p in (run_dir / "reads").glob("*/reads-rank*.json")) == \
        sorted(p.parent.name.split("-")[0] for p in (single_node_run / "reads").glob("*/reads-rank*.json"))

    # the same run: the same rows in the buffer, the same evaluations, the same reuse of rows
    assert read_rows(join_uri(storage, "buffer")) == read_rows(str(single_node_run / "buffer"))
    for key in ("baseline", "baseline_test", "final_test"):
        assert state.__dict__[key]["overall"] == single[key]["overall"], key
    assert [r["rollout"]["passed"] for r in state.iterations] == [r["rollout"]["passed"] for r in single["iterations"]]
    assert state.reuse == single["reuse"]
    # the same optimisation (stage θ of iteration 0 continued on a new worker group from its last checkpoint):
    # the same number of steps, each stage's losses and the published policy's weights within float32 rounding
    for mine, ref in zip(state.iterations, single["iterations"], strict=True):
        assert set(mine["stages"]) == set(ref["stages"])
        for stage in mine["stages"]:
            assert stage_metrics(mine, stage) == pytest.approx(stage_metrics(ref, stage), rel=1e-5), stage
    assert state.iterations[0]["stages"]["theta"]["step"] == 120
    assert_same_weights(state.policy, single["policy"])


def test_a_stage_continues_from_its_checkpoint_after_the_driver_is_killed(single_node_run, workdir):
    """The driver (its whole session, the local Ray included) is killed inside iteration 0's stage θ, after its
    first resumable checkpoint; `--resume` keeps stage φ, continues θ from its last checkpoint under the same
    Ray Train run, and ends where the uninterrupted run did: the same steps, losses, weights and rows read."""
    run_dir = workdir / "killed"
    args = ["--config", "ci_tiny", *OVERRIDES, "--run.iterations", "1", "--run-dir", str(run_dir),
            "--model.warm_start.cache_dir", str(workdir / "warm")]
    first = start_driver(args, workdir / "killed-first.log")
    deadline = time.time() + 900
    try:
        while time.time() < deadline and first.poll() is None:
            if glob.glob(str(run_dir / "train" / THETA_CHECKPOINT)):
                break
            time.sleep(0.2)
    finally:
        kill_session(first)
    assert glob.glob(str(run_dir / "train" / THETA_CHECKPOINT)), (workdir / "killed-first.log").read_text()[-3000:]
    assert not glob.glob(str(run_dir / "train" / "theta-iter0-*" / "final")), "killed too late: θ had finished"
    interrupted = json.loads((run_dir / "state.json").read_text())
    assert interrupted["completed_iterations"] == 0 and set(interrupted["in_progress"]["stages"]) == {"phi"}

    log = workdir / "killed-resumed.log"
    resumed = start_driver(["--resume", str(run_dir)], log)
    assert resumed.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "stage phi: finished before the interruption; not redone" in text
    assert "continued from its last checkpoint" in text
    state = json.loads((run_dir / "state.json").read_text())
    single = json.loads((single_node_run / "state.json").read_text())
    mine, ref = state["iterations"][0], single["iterations"][0]
    theta_run = interrupted["in_progress"]["running"]["theta"]
    assert mine["stages"]["theta"]["checkpoint"] == str(run_dir / "train" / theta_run / "final")  # the same run
    for stage in ("phi", "theta"):
        assert stage_metrics(mine, stage) == pytest.approx(stage_metrics(ref, stage), rel=1e-5), stage
    assert_same_weights(mine["stages"]["theta"]["checkpoint"], ref["stages"]["theta"]["checkpoint"])
    ref_theta_run = Path(ref["stages"]["theta"]["checkpoint"]).parent.name
    assert reads_of(run_dir, theta_run) == reads_of(single_node_run, ref_theta_run)  # no batch repeated or skipped


def test_a_path_the_second_node_cannot_read_is_refused_before_any_work(two_nodes, workdir, s3_uri):
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.util.storage import join_uri
    from bcoder_ray.loop.storage_probe import check_every_node_sees

    check_every_node_sees({"run.storage_uri": join_uri(s3_uri, "probe-ok")})  # every node reads the endpoint
    with pytest.raises(ConfigError, match=r"(?s)2 nodes.*run\.storage_uri.*BCODER_REQUIRE_URIS=1.*set run\.storage_uri"):
        check_every_node_sees({"run.storage_uri": str(workdir / "local-only")})
    assert not list((workdir / "local-only" / ".bcoder-probe").iterdir())  # the probe file is removed

    run_dir = workdir / "refused"
    plan = prepare_run(config="ci_tiny", run_dir=str(run_dir),
                       overrides=["--model.warm_start.cache_dir", str(workdir / "never")])
    with pytest.raises(ConfigError, match="buffer.uri"):
        run(plan)
    assert not (workdir / "never").exists()  # refused before the warm start
