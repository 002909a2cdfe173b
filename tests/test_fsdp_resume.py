"""A resumable checkpoint of an FSDP stage (`bcoder_ray.loop.learner.resume_state` / `load_resume_state` with
`bcoder_ray.loop.sharding`): two gloo processes shard a small network with dropout, one run saves its state after
step k on the way through 8 steps, a second run with other initial weights and RNG loads it and finishes;
its weights equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bcoder_ray.algorithms.base import AlgorithmConfig, Rows, RunContext, StagePlan
from bcoder_ray.config import StageConfig
from bcoder_ray.loop.learner import (RESUME_FILE, StageJob, learning_rate_factor, load_resume_state, resume_state,
                                write_resume_state)
from bcoder_ray.loop.sharding import shard_fully

STEPS = 8
WORLD = 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)])
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        for block in self.blocks:
            x = self.drop(torch.tanh(block(x)))
        return self.head(x).pow(2).mean()


class FolderCheckpoint:
    def __init__(self, path: str):
        self.path = path

    def as_directory(self):
        return contextlib.nullcontext(self.path)


def job() -> StageJob:
    return StageJob(algorithm="bcoder", algorithm_config=AlgorithmConfig(name="bcoder"),
                    context=RunContext(theta_ckpt="ckpt", tokenizer_path="ckpt", source_len=8, target_len=8),
                    plan=StagePlan("theta", Rows()), optim=StageConfig(steps=STEPS, grad_accum=1))


def run(rank: int, port: int, folder: str, at: int, resumed: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(123 if resumed else 0)  # the resumed run's weights and RNG must all come from the checkpoint
    net = shard_fully(Net(), torch.device("cpu"))
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, STEPS, "linear", 2))
    resumable = [*params, optimizer, scheduler, None]
    start = 0
    if resumed:
        start, history = load_resume_state(FolderCheckpoint(folder), job(), resumable, torch.device("cpu"), net)
        assert (start, history) == (at, [{"step": at}])
    for k in range(start, STEPS):
        if k == at and not resumed:
            state = resume_state(job(), k, resumable, [{"step": k}], net)  # every rank gathers
            if rank == 0:
                write_resume_state(folder, state)
        x = torch.arange(16.0).reshape(4, 4) / (k + 1) + rank  # batch k of this rank's shard
        net(x).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    whole = [p.full_tensor() for p in net.parameters()]
    if rank == 0:
        torch.save(whole, os.path.join(folder, "resumed.pt" if resumed else "straight.pt"))
    dist.barrier()  # no rank tears gloo down while another still talks to it (a rank aborted once without it)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("at", [3])
def test_an_fsdp_stage_continues_from_its_gathered_checkpoint(tmp_path, at):
    for resumed in (False, True):
        mp.spawn(run, args=(free_port(), str(tmp_path), at, resumed), nprocs=WORLD, join=True)
    saved = torch.load(tmp_path / RESUME_FILE, weights_only=False)
    shapes = [tuple(p.shape) for p in Net().parameters()]
    assert [tuple(t.shape) for t in saved["state"][:len(shapes)]] == shapes  # whole tensors, not one rank's shard
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)  # the same operations on the same values
