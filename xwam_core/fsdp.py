"""FSDP2 for the Trainer: how the training objective is sharded over the processes (train.strategy=fsdp2)."""

from __future__ import annotations

from typing import Any

import torch

from xwam_core.objective import TrainingObjective


def shard_fsdp2(objective: TrainingObjective, device: torch.device, mixed_precision: str) -> list[Any]:
    """Shard the trainable parts of `objective` over all processes with FSDP2; returns the sharded roots.

    torch's own `fully_shard` on a 1-D device mesh, not accelerate's FSDP plugin: that refuses CPU
    processes, while fully_shard runs on CPU ranks with gloo, so this path is tested here. Each block the
    transformer names in `_no_split_modules` (WanTransformerBlock: the trunk's and the depth branch's) is
    a unit, then the rest of the transformer; a trainable text conditioner is a unit of its own. The frozen
    codec (the VAE) and a frozen text table stay outside: never sharded, never optimised. Parameters are
    bf16 with float32 gradient reduction where train.mixed_precision resolved to bf16 (CUDA), float32
    otherwise; inputs are not cast (autocast decides, as on the DDP path). Call before making the optimiser.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    model = objective.model
    units = tuple(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in units:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    roots: list[Any] = [fully_shard(model, mesh=mesh, mp_policy=policy)]
    if any(p.requires_grad for p in objective.text.parameters()):
        roots.append(fully_shard(objective.text, mesh=mesh, mp_policy=policy))
    return roots
