"""Per-rollout and per-problem weights applied on top of TRL's losses, as small pure tensor functions.

The trainers only wire these into TRL's hooks; the math lives here so that it can be checked against hand-computed
values.
"""

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


ACE_TRANSFORMS = ("softplus", "relu")
ACE_CONFIDENCE_REDUCTIONS = ("sum", "mean")


def ace_confidence_shift(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor,
    reduction: str = "sum",
) -> torch.Tensor:
    """
    Confidence shift of each rollout: sum (or mean) over its completion tokens of `log π_old(y_t) − log π_ref(y_t)`.

    With `"sum"` this is ACE's sequence-level log-ratio `c_i = log π_old(y_i|x) − log π_ref(y_i|x)`. A positive shift
    means the policy has become more sure of this rollout than the reference model was. The result is detached: ACE
    uses it as a fixed coefficient, never as a path for gradients.

    Args:
        policy_logps (`torch.Tensor` of shape `(B, T)`):
            Per-token log-probabilities of the completion tokens under the sampling-time policy.
        reference_logps (`torch.Tensor` of shape `(B, T)`):
            Per-token log-probabilities of the same tokens under the reference model.
        mask (`torch.Tensor` of shape `(B, T)`):
            1 for completion tokens that count, 0 for padding (and tool output, when there is any).
        reduction (`str`, *optional*, defaults to `"sum"`):
            `"sum"` of the per-token log-ratios (the sequence-level log-ratio, as ACE defines it) or `"mean"` (divided
            by the number of counted tokens; near 0 for every rollout, which makes a softplus factor ≈ `1 + α·ln 2`).

    Returns:
        `torch.Tensor` of shape `(B,)`: the shift per rollout, `0` for a rollout with no counted tokens.

    Example:

    ```python
    >>> policy = torch.tensor([[-1.0, -2.0, -9.0]])
    >>> reference = torch.tensor([[-1.5, -3.0, -1.0]])
    >>> ace_confidence_shift(policy, reference, torch.tensor([[1, 1, 0]]))
    tensor([1.5000])
    >>> ace_confidence_shift(policy, reference, torch.tensor([[1, 1, 0]]), reduction="mean")
    tensor([0.7500])
    ```
    """
    if reduction not in ACE_CONFIDENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {ACE_CONFIDENCE_REDUCTIONS}, got {reduction!r}.")
    if policy_logps.shape != reference_logps.shape or policy_logps.shape != mask.shape:
        raise ValueError(
            "policy_logps, reference_logps and mask must have the same (batch, tokens) shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)} and {tuple(mask.shape)}."
        )
    counted = mask.bool()
    # Positions outside the mask may hold anything (padding is scored too); select rather than multiply so that a
    # non-finite value there cannot leak into the sum.
    log_ratio = torch.where(counted, policy_logps.detach() - reference_logps.detach(), 0.0)
    total = log_ratio.sum(dim=-1)
    if reduction == "sum":
        return total
    return total / counted.sum(dim=-1).clamp(min=1).to(total.dtype)


def ace_scale_factors(
    confidence_shift: torch.Tensor,
    alpha: float = 1.0,
    transform: str = "softplus",
    max_factor: float | None = None,
) -> torch.Tensor:
    """
    The factor `1 + α · g(c)` by which [`ace_scale_advantages`] multiplies a negative advantage, per rollout.

    Its size by `c`: for `c ≪ 0`, `softplus(c) ≈ e^c` and the factor is ≈ 1; at `c = 0` it is `1 + α·ln 2`; for
    `c ≫ 0`, `softplus(c) ≈ c` and the factor grows linearly, ≈ `1 + α·c` (a sequence-level shift of 20 nats makes
    a wrong rollout's advantage 21 times larger at `α = 1`). `relu` gives exactly 1 for `c ≤ 0` and `1 + α·c` above.

    Args:
        confidence_shift (`torch.Tensor`):
            Confidence shift `c` per rollout (see [`ace_confidence_shift`]).
        alpha (`float`, *optional*, defaults to `1.0`):
            Strength of the penalty, `>= 0`.
        transform (`str`, *optional*, defaults to `"softplus"`):
            `g`: `"softplus"` (smooth, always positive, `g(0) = ln 2`) or `"relu"` (only rollouts whose confidence
            grew get a factor above 1).
        max_factor (`float` or `None`, *optional*, defaults to `None`):
            Upper bound `>= 1` on the factor; `None` leaves it unbounded, as the paper does.

    Returns:
        `torch.Tensor`: the factors, same shape and dtype as `confidence_shift`, each `>= 1` (and `<= max_factor`).
    """
    if transform not in ACE_TRANSFORMS:
        raise ValueError(f"transform must be one of {ACE_TRANSFORMS}, got {transform!r}.")
    if not alpha >= 0:  # also rejects NaN
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    if max_factor is not None and not max_factor >= 1:
        raise ValueError(f"max_factor must be None or >= 1, got {max_factor}.")
    confidence_shift = confidence_shift.detach()
    if alpha == 0:
        # Exactly 1 even where g(c) is not finite, so that alpha = 0 is plain GRPO whatever the shifts are.
        return torch.ones_like(confidence_shift)
    penalty = torch.nn.functional.softplus(confidence_shift) if transform == "softplus" else confidence_shift.relu()
    factors = 1.0 + alpha * penalty
    if max_factor is not None:
        factors = factors.clamp(max=max_factor)
    return factors


def ace_scale_advantages(
    advantages: torch.Tensor,
    confidence_shift: torch.Tensor,
    alpha: float = 1.0,
    transform: str = "softplus",
    max_factor: float | None = None,
) -> torch.Tensor:
    """
    ACE's asymmetric confidence-aware error penalty: `Ã = A · (1 + α · g(c))` where `A < 0`, `Ã = A` elsewhere.

    Wrong rollouts (negative advantage) that the policy has grown more confident in than the reference model are
    pushed down harder. Rollouts with a non-negative advantage are returned bit for bit unchanged, and so is every
    advantage when `alpha = 0`.

    Args:
        advantages (`torch.Tensor`):
            Advantages, one per rollout (`(B,)`) or per token (`(B, T)`).
        confidence_shift (`torch.Tensor` of shape `(B,)`):
            Confidence shift `c` per rollout (see [`ace_confidence_shift`]); for `(B, T)` advantages, each rollout's
            shift applies to all of its tokens.
        alpha (`float`, *optional*, defaults to `1.0`):
            Strength of the penalty, `>= 0`.
        transform (`str`, *optional*, defaults to `"softplus"`):
            `g`: `"softplus"` (smooth, always positive, `g(0) = ln 2`) or `"relu"` (only rollouts whose confidence
            grew are scaled).
        max_factor (`float` or `None`, *optional*, defaults to `None`):
            Upper bound `>= 1` on the factor (see [`ace_scale_factors`]); `None` leaves it unbounded.

    Returns:
        `torch.Tensor`: the scaled advantages, same shape and dtype as `advantages`.

    Raises:
        `FloatingPointError`: if a scaled advantage is not finite (an infinite or NaN confidence shift of a wrong
        rollout, or a product beyond the dtype's range), rather than let it reach the loss.

    Example:

    ```python
    >>> ace_scale_advantages(torch.tensor([1.0, -1.0, -0.5]), torch.tensor([3.0, 0.0, 2.0]), transform="relu")
    tensor([ 1.0000, -1.0000, -1.5000])
    ```
    """
    if advantages.dim() not in (1, 2) or confidence_shift.shape != advantages.shape[:1]:
        raise ValueError(
            f"Expected advantages of shape (B,) or (B, T) and one confidence shift per rollout, of shape (B,); got "
            f"advantages {tuple(advantages.shape)} and confidence_shift {tuple(confidence_shift.shape)}."
        )
    factors = ace_scale_factors(confidence_shift, alpha, transform, max_factor).to(advantages.dtype)
    if advantages.dim() == 2:
        factors = factors.unsqueeze(-1)
    scaled = torch.where(advantages < 0, advantages * factors, advantages)
    if not torch.isfinite(scaled[torch.isfinite(advantages)]).all():
        raise FloatingPointError(
            "ACE scaled a finite advantage to a non-finite value (a confidence shift of inf/NaN, or a factor beyond "
            f"the {advantages.dtype} range; largest factor {factors.max().item():.4g}). Set a finite `max_factor` "
            "(ACEGRPOConfig.ace_max_factor) or lower alpha."
        )
    return scaled
