"""Token selection rules of TIP (Token Importance in on-Policy distillation), as pure tensor functions.

Every rule keeps `k_i = max(1, ⌊ρ·m_i⌋)` tokens of each non-empty rollout `i` (`m_i` = its completion tokens), so long
rollouts cannot starve short ones and the number of kept tokens is known from the completion lengths alone. Batch
statistics (the entropy quantile clip, min-max normalisation, medians) are taken over all completion tokens of the
batch passed in. Ties are broken toward the earlier position, so every rule but `random` and `entropy_sample` is
deterministic.
"""

from __future__ import annotations

import math

import torch


SELECTION_METHODS = (
    "all",
    "random",
    "entropy_sample",
    "entropy_topk",
    "divergence_topk",
    "soft_or",
    "overconfident",
)

# How the divergence axis of soft-OR is mapped to [0, 1]: "min_max" over the batch (reverse KL, unbounded), or
# "bounded" when it already lies in [0, 1] (JSD / ln 2) and is used as it is, as the authors' scoring code does.
DIVERGENCE_NORMALIZATIONS = ("min_max", "bounded")

# ⌊ρ·m⌋ is computed with this slack so that e.g. ρ = 0.29, m = 100 keeps 29 tokens despite 0.29·100 = 28.999...
_FLOOR_SLACK = 1e-6


def tokens_per_rollout(mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    Number of tokens each rollout keeps: `max(1, ⌊ratio·m_i⌋)` for a rollout with `m_i > 0` completion tokens, `0` for
    an empty one.

    Args:
        mask (`torch.Tensor`): `(B, T)` mask of completion tokens (bool or 0/1).
        ratio (`float`): the kept fraction ρ in (0, 1].

    Returns:
        `torch.LongTensor`: `(B,)` counts.
    """
    lengths = (mask != 0).sum(dim=-1)
    kept = torch.floor(lengths.double() * ratio + _FLOOR_SLACK).long()
    return torch.where(lengths > 0, kept.clamp(min=1), torch.zeros_like(kept)).clamp(max=lengths)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The `q`-quantile of a 1-D tensor with linear interpolation (as `torch.quantile`, without its size limit)."""
    ordered = torch.sort(values.float()).values
    position = q * (ordered.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def min_max_normalize(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    `(x − min) / (max − min)` with min and max over the masked entries; `0` everywhere when they are all equal, and `0`
    outside the mask.
    """
    valid = values[mask]
    if valid.numel() == 0:
        return torch.zeros_like(values)
    low, high = valid.min(), valid.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(values)
    return ((values - low) / span).masked_fill(~mask, 0.0)


def _clipped_min_max(values, mask, clip_quantile):
    # Soft-OR steps a–b for one axis: clip at the batch quantile (so a few extreme tokens, near-uniform for entropy or
    # heavy-tailed for reverse KL, don't squash the rest), then min-max.
    if clip_quantile < 1.0 and mask.any():
        values = torch.minimum(values, quantile(values[mask], clip_quantile))
    return min_max_normalize(values, mask)


def normalized_divergence(
    divergence: torch.Tensor,
    mask: torch.Tensor,
    divergence_clip_quantile: float = 1.0,
    normalization: str = "min_max",
) -> torch.Tensor:
    """
    The divergence axis `δ̂ ∈ [0, 1]` of soft-OR, over the masked tokens of the batch passed in; `0` outside the mask.

    With `normalization="min_max"` (an unbounded divergence such as reverse KL) `δ` is first clipped at its batch
    `divergence_clip_quantile` (`1.0` = no clip), so that one heavy-tailed outlier cannot squash every other token
    towards 0, then min-max normalised. With `"bounded"` the divergence must already lie in `[0, 1]` (JSD / ln 2) and
    is returned as it is; a clip would only flatten its top, so `divergence_clip_quantile` must then be `1.0`.
    """
    if normalization not in DIVERGENCE_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {DIVERGENCE_NORMALIZATIONS}, got {normalization!r}.")
    if not 0.0 < divergence_clip_quantile <= 1.0:
        raise ValueError(f"divergence_clip_quantile must be in (0, 1], got {divergence_clip_quantile}.")
    mask = mask != 0
    divergence = divergence.float()
    if normalization == "bounded":
        if divergence_clip_quantile < 1.0:
            raise ValueError("A bounded divergence axis is used as it is: divergence_clip_quantile must be 1.0.")
        return divergence.clamp(0.0, 1.0).masked_fill(~mask, 0.0)
    return _clipped_min_max(divergence, mask, divergence_clip_quantile)


def soft_or_score(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    entropy_clip_quantile: float = 0.98,
    divergence_clip_quantile: float = 1.0,
    divergence_normalization: str = "min_max",
) -> torch.Tensor:
    """
    TIP's soft-OR score `s = ĥ + δ̂ − ĥ·δ̂ = 1 − (1 − ĥ)(1 − δ̂)`: high when the student is uncertain *or* far from the
    teacher. `ĥ` is the entropy clipped at its batch `entropy_clip_quantile` and min-max normalised, `δ̂` the
    divergence axis of [`normalized_divergence`] (by default: min-max normalised reverse KL, optionally clipped at its
    batch `divergence_clip_quantile` first); both over the masked tokens. `0` outside the mask.
    """
    mask = mask != 0
    entropy_hat = _clipped_min_max(entropy.float(), mask, entropy_clip_quantile)
    divergence_hat = normalized_divergence(divergence, mask, divergence_clip_quantile, divergence_normalization)
    return (entropy_hat + divergence_hat - entropy_hat * divergence_hat).masked_fill(~mask, 0.0)


def overconfidence_score(
    entropy: torch.Tensor, forward_kl: torch.Tensor, mask: torch.Tensor, entropy_clip_quantile: float = 0.98
) -> torch.Tensor:
    """
    The Q3 ("confident and wrong") score `w = φ·(1 − ĥ)`: forward KL of the teacher to the student, weighted by the
    student's confidence, with `ĥ` normalised as in [`soft_or_score`]. `0` outside the mask.
    """
    mask = mask != 0
    entropy_hat = _clipped_min_max(entropy.float(), mask, entropy_clip_quantile)
    return (forward_kl.float() * (1.0 - entropy_hat)).masked_fill(~mask, 0.0)


def top_per_rollout(scores: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """
    Keep the `counts[i]` highest-scoring masked tokens of each row `i`; ties go to the earlier position.

    Returns:
        `torch.BoolTensor`: `(B, T)` mask, a subset of `mask`.
    """
    mask = mask != 0
    masked_scores = scores.float().masked_fill(~mask, -math.inf)
    order = torch.sort(masked_scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return (ranks < counts.unsqueeze(-1)) & mask


def _uniform(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device (CPU generators are the common case), then moved next to the scores.
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def select_tokens(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    method: str = "soft_or",
    ratio: float = 0.5,
    forward_kl: torch.Tensor | None = None,
    entropy_clip_quantile: float = 0.98,
    generator: torch.Generator | None = None,
    divergence_clip_quantile: float = 1.0,
    divergence_normalization: str = "min_max",
) -> torch.BoolTensor:
    """
    Choose the completion tokens that on-policy distillation trains on.

    Args:
        entropy (`torch.Tensor`): `(B, T)` normalised student entropy h ∈ [0, 1].
        divergence (`torch.Tensor`): `(B, T)` per-token divergence the rules rank by: reverse KL δ = KL(student ||
            teacher), or a bounded one in [0, 1] (JSD / ln 2) with `divergence_normalization="bounded"`.
        mask (`torch.Tensor`): `(B, T)` mask of completion tokens (padding and prompt excluded).
        method (`str`, defaults to `"soft_or"`): one of
            - `"all"`: every completion token (plain OPD); `ratio` is ignored.
            - `"random"`: uniform sample without replacement within each rollout (the control).
            - `"entropy_sample"`: sample without replacement within each rollout with probability ∝ h (rollouts whose
              tokens all have zero entropy are sampled uniformly).
            - `"entropy_topk"`: the highest h.
            - `"divergence_topk"`: the highest δ.
            - `"soft_or"`: the highest soft-OR score of clipped, normalised h and δ (see [`soft_or_score`]).
            - `"overconfident"`: the highest φ·(1 − ĥ), the confident-and-wrong tokens (needs `forward_kl`).
        ratio (`float`, defaults to `0.5`): fraction ρ ∈ (0, 1] kept in each rollout, at least one token.
        forward_kl (`torch.Tensor`, *optional*): `(B, T)` per-token KL(teacher || student); for `"overconfident"`.
        entropy_clip_quantile (`float`, defaults to `0.98`): batch quantile at which entropy is clipped before
            normalisation (`"soft_or"`, `"overconfident"`); `1.0` disables the clip.
        generator (`torch.Generator`, *optional*): random source of `"random"` and `"entropy_sample"`.
        divergence_clip_quantile (`float`, defaults to `1.0`): batch quantile at which the divergence is clipped before
            min-max normalisation (`"soft_or"`); `1.0` disables the clip.
        divergence_normalization (`str`, defaults to `"min_max"`): how `"soft_or"` maps the divergence to [0, 1]:
            `"min_max"` over the batch, or `"bounded"` (already in [0, 1], used as it is); see
            [`normalized_divergence`].

    Returns:
        `torch.BoolTensor`: `(B, T)` mask of kept tokens, a subset of `mask`, with exactly
        `max(1, ⌊ρ·m_i⌋)` tokens in each non-empty row `i`.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"Unknown token selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}.")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    if not 0.0 < entropy_clip_quantile <= 1.0:
        raise ValueError(f"entropy_clip_quantile must be in (0, 1], got {entropy_clip_quantile}.")
    if not 0.0 < divergence_clip_quantile <= 1.0:
        raise ValueError(f"divergence_clip_quantile must be in (0, 1], got {divergence_clip_quantile}.")
    if entropy.shape != mask.shape or divergence.shape != mask.shape or entropy.dim() != 2:
        raise ValueError(
            f"entropy {tuple(entropy.shape)}, divergence {tuple(divergence.shape)} and mask {tuple(mask.shape)} must "
            "all have the same (batch, tokens) shape."
        )
    mask = mask != 0
    if method == "all" or not mask.any():
        return mask.clone()
    counts = tokens_per_rollout(mask, ratio)

    if method == "random":
        scores = _uniform(mask.shape, entropy, generator)
    elif method == "entropy_sample":
        # Gumbel-top-k: the k largest log(w) + Gumbel keys are a sample without replacement with probability ∝ w.
        # Zero-weight tokens get keys below every positive-weight one, and among themselves a uniform order.
        uniform = _uniform(mask.shape, entropy, generator).clamp(1e-12, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        weight = entropy.float().clamp(min=0.0)
        scores = torch.where(weight > 0, torch.log(weight.clamp(min=torch.finfo(torch.float32).tiny)) + gumbel, gumbel - 1e4)
    elif method == "entropy_topk":
        scores = entropy
    elif method == "divergence_topk":
        scores = divergence
    elif method == "soft_or":
        scores = soft_or_score(
            entropy, divergence, mask, entropy_clip_quantile, divergence_clip_quantile, divergence_normalization
        )
    else:  # overconfident
        if forward_kl is None:
            raise ValueError("method='overconfident' ranks tokens by forward KL: pass `forward_kl`.")
        if forward_kl.shape != mask.shape:
            raise ValueError(f"forward_kl {tuple(forward_kl.shape)} must have the mask's shape {tuple(mask.shape)}.")
        scores = overconfidence_score(entropy, forward_kl, mask, entropy_clip_quantile)
    return top_per_rollout(scores, mask, counts)


def quadrant_counts(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Token counts of TIP's four quadrants, split at the batch medians of entropy and divergence over the masked tokens:
    Q1 high h / high δ, Q2 high h / low δ, Q3 low h / high δ (overconfident), Q4 low h / low δ. "High" is strictly
    above the median.

    Returns:
        `torch.Tensor`: `(4,)` float counts `[Q1, Q2, Q3, Q4]`.
    """
    mask = mask != 0
    if not mask.any():
        return torch.zeros(4, device=entropy.device)
    h, d = entropy[mask].float(), divergence[mask].float()
    high_h, high_d = h > quantile(h, 0.5), d > quantile(d, 0.5)
    return torch.stack(
        [
            (high_h & high_d).sum(),
            (high_h & ~high_d).sum(),
            (~high_h & high_d).sum(),
            (~high_h & ~high_d).sum(),
        ]
    ).float()
