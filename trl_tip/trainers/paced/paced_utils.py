"""PACED's pure helpers: the KL schedule and the teacher's completions up to their end."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .paced_config import KL_SCHEDULES


def schedule_switch_step(max_steps: int, fraction: float) -> int:
    """The first optimiser step of the reverse-KL phase of `"forward_then_reverse"`: `⌊fraction × max_steps⌋`."""
    return math.floor(fraction * max_steps)


def paced_phase(
    step: int,
    max_steps: int,
    kl_schedule: str | None,
    switch_fraction: float,
    rollout_source: str,
    beta: float = 1.0,
) -> tuple:
    """
    Divergence and rollout source at optimiser step `step` (0-based); `beta` is the configured one, used throughout
    when `kl_schedule` is `None`.

    Returns:
        `tuple[float, str]`: TRL's `beta` (`0.0` forward KL, `1.0` reverse KL) and `"student"` or `"teacher"`.
    """
    if kl_schedule is None:
        return beta, rollout_source
    if kl_schedule == "reverse":
        return 1.0, rollout_source
    if kl_schedule == "forward":
        return 0.0, rollout_source
    if kl_schedule == "forward_then_reverse":
        return (0.0, "teacher") if step < schedule_switch_step(max_steps, switch_fraction) else (1.0, "student")
    raise ValueError(f"kl_schedule must be one of {', '.join(KL_SCHEDULES)}, got {kl_schedule!r}.")


def completion_ids_until_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each row of `(B, T)` generated ids up to and including its first end-of-sequence token (all of it if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.size(1))
    return [row[:length].tolist() for row, length in zip(completion_ids.cpu(), lengths.cpu().tolist(), strict=True)]
