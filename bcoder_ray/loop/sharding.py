"""How a stage's module is spread over the Ray Train workers: DDP (a full copy per worker) or FSDP (torch's
FSDP2 `fully_shard`: parameters, gradients and optimiser states sharded across the workers).

    module, params = distribute(stage, "fsdp", device)   # inside a Ray Train worker (the process group exists)
    with gradient_sync(module, sync=last_micro_batch):
        loss, metrics = module(batch); loss.backward()
    norm = global_grad_norm(torch.nn.utils.clip_grad_norm_(params, clip))
    plain = saveable(stage, rebuild=lambda: algorithm.build_stage(plan), rank0=rank0)  # every rank calls
    if rank0: plain.save(directory, tokenizer)

FSDP units: each block of a model's outermost `nn.ModuleList`s (the transformer layers of GPT-2's `h`, Llama's
`layers`, T5's `block`) is one unit, gathered for its own forward and backward only; everything else (embeddings,
final norms, LM and value heads) is the stage module's root unit, gathered for the whole forward. The frozen
networks a stage holds (θ_ckpt, φ, an encoder-decoder's shared encoder) are sharded the same way and get no
gradient. The parameters stay float32 masters: mixed precision is the learner's autocast, as under DDP, so FSDP's
losses equal DDP's up to the order of the gradient sums.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

PARALLEL = ("ddp", "fsdp")


def block_lists(module: nn.Module) -> list[str]:
    """Names of the outermost `nn.ModuleList`s under `module` (a `ModuleList` inside another one's block is
    part of that block's unit)."""
    outer: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
    return outer


def shard_fully(module: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2 to `module` in place, bottom-up: each block of `block_lists(module)` that holds parameters,
    then the root. The parameters become `DTensor` shards on `device`'s mesh over all ranks."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for name in block_lists(module):
        for block in module.get_submodule(name):
            if next(block.parameters(), None) is not None:
                fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def distribute(stage: nn.Module, parallel: str, device: torch.device,
               in_ray_train: bool = True) -> tuple[nn.Module, list[nn.Parameter]]:
    """(the module to call, the trained parameters in the order of `stage.trainable_parameters()`) for a stage
    built on this worker. DDP: Ray Train's `prepare_model` (moved to `device`, DDP over the trained parameters
    when there is more than one worker), or, outside a Ray Train worker (`in_ray_train=False`: a persistent
    learner's actors, `bcoder_ray.loop.learner_group`), the same done here over torch.distributed's default
    group. FSDP: `shard_fully`, whose parameters replace the stage's own."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    trained = stage.trainable_parameters()
    if parallel == "ddp":
        if in_ray_train:
            import ray.train.torch

            return ray.train.torch.prepare_model(stage), trained
        stage.to(device)
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return stage, trained
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(stage, device_ids=ids), trained
    names = {id(p): n for n, p in stage.named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for p in trained]
    shard_fully(stage, device)
    sharded = dict(stage.named_parameters(remove_duplicate=False))
    return stage, [sharded[n] for n in order]


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce the gradients across workers only when `sync` (the
    last micro-batch of a step); the others accumulate locally (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`)."""
    if sync:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:  # one worker: nothing to reduce
        yield


def global_grad_norm(norm: torch.Tensor) -> float:
    """The total gradient norm `clip_grad_norm_` returned, as a float (a sharded norm is reduced over ranks)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def portable_state(obj, module: nn.Module):
    """What a resume checkpoint stores of `obj` (a trained parameter, the optimiser, the scheduler or the grad
    scaler), whole and on the CPU. For an FSDP `module` a parameter's shards and the optimiser's states are
    gathered (a collective: every rank calls, in the same order), so the checkpoint does not depend on the number
    of workers' shards it came from."""
    if isinstance(obj, torch.Tensor):
        whole = obj.full_tensor() if isinstance(obj, DTensor) else obj
        return whole.detach().cpu().clone()
    if isinstance(obj, torch.optim.Optimizer) and is_sharded(module):
        return get_optimizer_state_dict(module, obj, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
    return obj.state_dict()


def restore_state(target, state, module: nn.Module) -> None:
    """Put back what `portable_state` stored (every rank reads the same checkpoint): a sharded parameter takes
    its own shard of the whole tensor."""
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            if isinstance(target, DTensor):
                target.copy_(distribute_tensor(state.to(target.device), target.device_mesh, target.placements))
            else:
                target.copy_(state.to(target.device))
    elif isinstance(target, torch.optim.Optimizer) and is_sharded(module):
        set_optimizer_state_dict(module, target, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        target.load_state_dict(state)


def saveable(module: nn.Module, rebuild: Callable[[], nn.Module], rank0: bool) -> nn.Module | None:
    """The module to save the stage from. Unsharded: `module` itself. FSDP: the full parameters are gathered to
    rank 0's CPU (a collective: every rank must call) and loaded into a fresh, plain copy from `rebuild()`
    there (`save_pretrained` of an FSDP module would write its DTensor shards); None on the other ranks."""
    if not is_sharded(module):
        return module
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rank0:
        return None
    plain = rebuild()
    plain.load_state_dict(state)
    return plain
