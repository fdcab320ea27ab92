"""Quantisation helpers shared by the trainers."""

from __future__ import annotations

import torch


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """
    Stop bitsandbytes from repacking a trained model's 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, a `bnb.nn.Linear4bit` that runs in eval mode on an input without gradient (evaluation,
    a pass-rate estimate, a frozen-adapter teacher) repacks its weight in place, for good, into a layout whose kernel
    has no backward; the next training forward then fails (`a view of a leaf Variable that requires grad is being
    used in an in-place operation`). A model being trained must keep the trainable layout, so the repack is turned
    off on its 4-bit layers. Frozen teachers keep it: they never train.

    Returns:
        `int`: the number of 4-bit layers changed (0 without bitsandbytes or without 4-bit layers).
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and type(module).__name__ in ("Linear4bit", "LinearNF4",
                                                                                                "LinearFP4"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
