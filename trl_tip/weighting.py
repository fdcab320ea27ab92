"""Per-problem and per-rollout weights, as pure tensor functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def paced_weight(
    pass_rate: torch.Tensor | Sequence[float] | float, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    """
    PACED problem weight `w(p) = p^α (1 − p)^β`, elementwise.

    The weight peaks at the frontier of the student's competence, `p* = α / (α + β)` (`0.5` for the default
    `α = β = 1`, where `w = p(1 − p)`), and vanishes at `p = 0` (never solved: the teacher's signal is out of reach)
    and `p = 1` (always solved: nothing left to learn) whenever `α, β > 0`. With `α = β = 0` every weight is `1`
    (`0^0 = 1`), i.e. no weighting.

    Args:
        pass_rate (`torch.Tensor`, sequence of `float` or `float`):
            Student pass rates in `[0, 1]`.
        alpha (`float`, *optional*, defaults to `1.0`):
            Exponent α ≥ 0 of `p`: larger values move weight towards problems the student already solves often.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent β ≥ 0 of `1 − p`: larger values move weight towards problems the student rarely solves.

    Returns:
        `torch.Tensor`: weights of the same shape as `pass_rate` (float32 unless a floating tensor was given).

    Example:

    ```python
    >>> paced_weight([0.0, 0.25, 0.5, 1.0])
    tensor([0.0000, 0.1875, 0.2500, 0.0000])
    ```
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"paced_weight needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}.")
    p = torch.as_tensor(pass_rate)
    if not torch.is_floating_point(p):
        p = p.float()
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"Pass rates must lie in [0, 1]; got values from {p.min().item()} to {p.max().item()}.")
    return p.pow(alpha) * (1 - p).pow(beta)
