"""
Models held the way the student is sharded, and copies between them that stay on each rank's own shards.

Under DeepSpeed ZeRO-3 every parameter keeps its rank's partition in `param.ds_tensor` (a flat slice of
`ceil(numel / world_size)` elements); under FSDP2 every parameter is a `DTensor` whose local tensor is its rank's
shard. Two copies of one architecture sharded by the same engine over the same world hold matching slices on every
rank, so a snapshot θ̄ ← θ is a local copy per rank with no collective and no full model anywhere. The only
exceptions are ZeRO-3's persistent parameters (small ones kept gathered on every rank), which are copied whole.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def is_deepspeed_zero3(accelerator) -> bool:
    """Whether `accelerator` runs DeepSpeed with ZeRO stage 3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type.name == "DEEPSPEED" and plugin is not None and plugin.zero_stage == 3


def is_fsdp2(accelerator) -> bool:
    """Whether `accelerator` runs PyTorch FSDP2 (`fully_shard`)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return accelerator.distributed_type.name == "FSDP" and plugin is not None and plugin.fsdp_version == 2


def is_sharded(accelerator) -> bool:
    """Whether the student's parameters are split across ranks (ZeRO-3 or FSDP2)."""
    return is_deepspeed_zero3(accelerator) or is_fsdp2(accelerator)


def fsdp2_shard_for_inference(model: nn.Module, accelerator) -> nn.Module:
    """
    Shard a frozen model (a teacher, a snapshot) with FSDP2 exactly as accelerate shards the student: one unit per
    decoder block, the embeddings and the head in their own units, then the root; with `cpu_ram_efficient_loading`
    rank 0's weights are broadcast into the shards. No optimiser state exists for it, and each rank holds about
    1/world_size of its parameters between forwards.

    Args:
        model (`torch.nn.Module`): the model, unsharded (or, on ranks other than 0 under `cpu_ram_efficient_loading`,
            on the meta device).
        accelerator (`~accelerate.Accelerator`): an accelerator running FSDP2.

    Returns:
        `torch.nn.Module`: the same model, sharded in place, frozen and in eval mode.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model.requires_grad_(False)
    state = accelerator.state
    plugin = state.fsdp_plugin
    # `fsdp2_prepare_model` fixes the plugin's wrap policy to the first model it sees; a copy keeps the student's
    # (prepared later, possibly of another architecture) derived from the student.
    state.fsdp_plugin = copy.copy(plugin)
    try:
        model = fsdp2_prepare_model(accelerator, model)
    finally:
        state.fsdp_plugin = plugin
    # accelerate keeps the head's unit and the root gathered after the forward, for the backward that follows; a
    # frozen model has no backward, so every unit frees its gathered weights as soon as its forward ends.
    model.set_reshard_after_forward(True, recurse=True)
    model.eval()
    return model


def prepare_frozen_model(model: nn.Module, accelerator) -> nn.Module:
    """
    Prepare a model used for inference only the way the student is sharded: TRL's `prepare_deepspeed` under DeepSpeed
    (ZeRO-3 partitions it), [`fsdp2_shard_for_inference`] under FSDP2, otherwise accelerate's evaluation-mode
    preparation (one full copy per rank, as in DDP).
    """
    if accelerator.distributed_type.name == "DEEPSPEED":
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if is_fsdp2(accelerator):
        return fsdp2_shard_for_inference(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def _is_zero3_parameter(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _zero3_available(tensor: torch.Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return tensor.ds_status == ZeroParamStatus.AVAILABLE


def _zero3_partition_of(full: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    # ZeRO-3's layout: the flattened parameter, zero-padded to world_size equal slices, rank r holding slice r.
    import torch.distributed as dist

    size = partition.numel()
    flat = full.detach().reshape(-1)
    start = dist.get_rank() * size
    piece = torch.zeros(size, dtype=partition.dtype, device=partition.device)
    end = min(start + size, flat.numel())
    if end > start:
        piece[: end - start] = flat[start:end]
    return piece.view_as(partition)


@torch.no_grad()
def copy_into_(target: torch.Tensor, source: torch.Tensor, name: str = "tensor") -> None:
    """
    θ̄ ← θ for one tensor, each rank writing only what it holds of `target`.

    Both sharded the same way (FSDP2 `DTensor`s with equal mesh and placements, or ZeRO-3 parameters): the local
    shards are copied, with no collective. `source` whole (a plain tensor, e.g. the student before it is sharded or a
    snapshot read from disk) and `target` sharded: each rank copies its own slice of it. ZeRO-3 persistent parameters
    (kept gathered on every rank) also get their full copy, from the source's own full copy when it has one and from
    a gather of that one parameter otherwise.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        if isinstance(source, DTensor):
            if source.device_mesh != target.device_mesh or source.placements != target.placements:
                raise RuntimeError(
                    f"Cannot copy {name!r} shard to shard: placements {source.placements} vs {target.placements}; "
                    "both models must be sharded by the same FSDP2 plan."
                )
            local = source.to_local()
        else:
            local = distribute_tensor(
                source.detach().to(target.device), target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
        target.to_local().copy_(local)
        return
    if isinstance(source, DTensor):
        raise RuntimeError(
            f"Cannot copy the FSDP2-sharded {name!r} into an unsharded copy without a gather; shard both models."
        )
    if _is_zero3_parameter(target):
        if _is_zero3_parameter(source):
            target.ds_tensor.copy_(source.ds_tensor)
        else:
            target.ds_tensor.copy_(_zero3_partition_of(source, target.ds_tensor))
        if _zero3_available(target):
            if not _is_zero3_parameter(source) or _zero3_available(source):
                target.data.copy_(source.data)
            else:
                import deepspeed

                with deepspeed.zero.GatheredParameters([source]):
                    target.data.copy_(source.data)
        return
    if _is_zero3_parameter(source):
        import deepspeed

        with deepspeed.zero.GatheredParameters([source]):
            target.copy_(source)
        return
    target.copy_(source)


def full_copy(tensor: torch.Tensor) -> torch.Tensor:
    """
    The whole tensor on every rank, for writing a checkpoint: `full_tensor()` of an FSDP2 shard, a gather of a ZeRO-3
    parameter, the tensor itself otherwise. A collective when sharded: every rank must call it, in the same order.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    if _is_zero3_parameter(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor.detach()


def local_numel(tensor: torch.Tensor) -> int:
    """Elements of `tensor` this rank stores at rest: its FSDP2 shard, its ZeRO-3 partition, or all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local().numel()
    if _is_zero3_parameter(tensor):
        # The partition, plus the whole tensor for the small parameters ZeRO-3 keeps gathered for good; copies it
        # gathers for a forward (and may keep for reuse, up to `stage3_max_live_parameters`) are transient.
        return tensor.ds_tensor.numel() + (tensor.ds_numel if getattr(tensor, "ds_persist", False) else 0)
    return tensor.numel()


def requested_fsdp_version(args) -> int | None:
    """
    The FSDP version a run asks for, read before anything is built: the training arguments' `fsdp_config`, or the
    environment `accelerate launch` sets from its config file. `None` without FSDP.
    """
    import os

    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    if "fsdp_version" in plugin_args:
        return int(plugin_args["fsdp_version"])
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def requested_sharded_engine(args=None) -> str | None:
    """
    "DeepSpeed ZeRO-3" or "FSDP" when a run asks for sharded weights (training arguments or `accelerate launch`'s
    environment), read before anything is built; `None` otherwise.
    """
    import os

    if requested_fsdp_version(args) is not None:
        return "FSDP"
    stage = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    deepspeed = getattr(args, "deepspeed", None)
    if isinstance(deepspeed, dict):
        stage = deepspeed.get("zero_optimization", {}).get("stage", stage)
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None
