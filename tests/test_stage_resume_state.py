"""A stage's resumable state (`bcoder_ray.loop.learner.resume_state` / `write_resume_state` / `load_resume_state`): continuing from a
checkpoint taken after step k gives exactly the parameters of the uninterrupted run (CPU, in-process; the
stage-level resume after killing a worker or the driver is in tests/test_cluster.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bcoder_ray.algorithms.base import AlgorithmConfig, Rows, RunContext, StagePlan
from bcoder_ray.config import StageConfig
from bcoder_ray.loop.learner import (RESUME_FILE, StageJob, learning_rate_factor, load_resume_state, resume_state,
                                write_resume_state)


class FolderCheckpoint:
    """What the loader uses of `ray.train.Checkpoint`: a folder and `as_directory()`."""

    def __init__(self, path: str):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(self.path)


def job(steps: int = 8) -> StageJob:
    return StageJob(algorithm="bcoder", algorithm_config=AlgorithmConfig(name="bcoder"),
                    context=RunContext(theta_ckpt="ckpt", tokenizer_path="ckpt", source_len=8, target_len=8),
                    plan=StagePlan("theta", Rows()), optim=StageConfig(steps=steps, grad_accum=1))


def setup(seed: int = 0):
    """A tiny network with dropout (it draws from the RNG), AdamW and a linear-decay schedule."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, 8, "linear", 2))
    return net, [*params, optimizer, scheduler, None]


def step(net, resumable, k: int) -> None:
    x = torch.arange(16.0).reshape(4, 4) / (k + 1)  # batch k: what the data position selects
    loss = net(x).pow(2).mean()
    loss.backward()
    resumable[-3].step()
    resumable[-2].step()
    resumable[-3].zero_grad()


@pytest.mark.parametrize("at", [0, 3, 8])
def test_continuing_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, at):
    net, resumable = setup()
    for k in range(8):
        if k == at:
            write_resume_state(str(tmp_path), resume_state(job(), k, resumable, history=[{"step": k}]))
        step(net, resumable, k)
    if at == 8:
        write_resume_state(str(tmp_path), resume_state(job(), 8, resumable, history=[{"step": 8}]))
    expected = [p.detach().clone() for p in net.parameters()]

    other, restored = setup(seed=123)  # other initial weights and RNG: everything comes from the checkpoint
    start, history = load_resume_state(FolderCheckpoint(str(tmp_path)), job(), restored, torch.device("cpu"))
    assert (start, history) == (at, [{"step": at}])
    for k in range(start, 8):
        step(other, restored, k)
    for mine, ref in zip(other.parameters(), expected):
        assert torch.equal(mine, ref)  # the same operations on the same values: bit for bit
    assert restored[-2].last_epoch == resumable[-2].last_epoch == 8


def test_a_checkpoint_of_another_stage_or_length_is_refused(tmp_path):
    net, resumable = setup()
    write_resume_state(str(tmp_path), resume_state(job(), 2, resumable, history=[]))
    with pytest.raises(RuntimeError, match="of 8 steps.*of 9 steps"):
        load_resume_state(FolderCheckpoint(str(tmp_path)), job(steps=9), resumable, torch.device("cpu"))
    phi = dataclasses.replace(job(), plan=StagePlan("phi", Rows()))
    with pytest.raises(RuntimeError, match="'theta'.*'phi'"):
        load_resume_state(FolderCheckpoint(str(tmp_path)), phi, resumable, torch.device("cpu"))
    (tmp_path / RESUME_FILE).unlink()
    with pytest.raises(RuntimeError, match=f"no {RESUME_FILE}"):
        load_resume_state(FolderCheckpoint(str(tmp_path)), job(), resumable, torch.device("cpu"))
    assert load_resume_state(None, job(), resumable, torch.device("cpu")) == (0, [])
