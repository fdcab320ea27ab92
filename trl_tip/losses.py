"""The distillation loss over selected tokens, with the signature of TRL's chunked divergence loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._trl_compat import use_triton
from .chunked_stats import divergence_from_stats, normalized_jsd, shared_vocab_head, student_entropy, token_stats
from .selection import normalized_divergence, select_tokens


# The divergence TIP's rules rank tokens by. The trained loss is TRL's divergence with `beta` whichever is chosen.
SELECTION_DIVERGENCES = ("reverse_kl", "jsd")
# Rules that select from the student's entropy (or nothing) alone: the teacher's `lm_head` is projected on the tokens
# they keep only.
STUDENT_SIDE_METHODS = ("random", "entropy_sample", "entropy_topk")


@dataclass
class SelectiveLossOutput:
    """
    What [`selective_divergence_loss`] returns.

    Attributes:
        loss (`torch.Tensor`): scalar loss (differentiable).
        entropy_sum (`torch.Tensor`): sum of the student's entropy in nats over all completion tokens (detached).
        num_valid (`torch.Tensor`): number of completion tokens.
        mask (`torch.BoolTensor`): `(B, T)` completion tokens.
        keep (`torch.BoolTensor`): `(B, T)` kept tokens, a subset of `mask`.
        entropy (`torch.Tensor`): `(B, T)` normalised student entropy (0 outside the mask on GPU).
        reverse_kl (`torch.Tensor`): `(B, T)` per-token KL(student || teacher); `NaN` outside `keep` for the rules
            of `STUDENT_SIDE_METHODS` at `ratio < 1`, which never project the teacher there.
        divergence_hat (`torch.Tensor` or `None`): `(B, T)` the divergence axis δ̂ ∈ [0, 1] soft-OR ranked by (0 outside
            the mask); `None` for the other rules.
    """

    loss: torch.Tensor
    entropy_sum: torch.Tensor
    num_valid: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    divergence_hat: torch.Tensor | None = None


def rollout_token_coefficients(
    keep: torch.Tensor, rollout_weights: torch.Tensor, weight_sum: torch.Tensor | float | None = None
) -> torch.Tensor:
    """
    Per-token loss coefficients that turn a sum over kept tokens into a weighted mean over rollouts.

    Token `t` of rollout `i` gets `c_{i,t} = w_i / (k_i · W)` when kept (`k_i` = rollout `i`'s kept tokens), `0`
    otherwise, so that `Σ_{i,t} c_{i,t} d_{i,t} = Σ_i w_i ℓ_i / W` with `ℓ_i` the mean of `d` over rollout `i`'s kept
    tokens. A rollout without kept tokens contributes nothing (its weight still counts in `W`), and `W = 0` gives all
    zeros, never a division by zero.

    Args:
        keep (`torch.Tensor`): `(B, T)` kept tokens (bool or 0/1).
        rollout_weights (`torch.Tensor`): `(B,)` non-negative weights `w_i`.
        weight_sum (`torch.Tensor` or `float`, *optional*):
            The normaliser `W`; the sum of `rollout_weights` when `None`. Pass the sum over the whole (global,
            all-accumulation-steps) batch when the loss is accumulated over several micro-batches.

    Returns:
        `torch.Tensor`: `(B, T)` float32 coefficients.
    """
    keep = keep != 0
    weights = rollout_weights.to(device=keep.device, dtype=torch.float32).reshape(-1)
    if weights.numel() != keep.shape[0]:
        raise ValueError(f"Got {weights.numel()} rollout weights for a batch of {keep.shape[0]} rollouts.")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("Rollout weights must be finite and non-negative.")
    total = weights.sum() if weight_sum is None else torch.as_tensor(weight_sum, dtype=torch.float32)
    total = total.to(keep.device)
    kept = keep.sum(dim=-1)
    usable = (kept > 0) & (total > 0)
    denominator = torch.where(usable, kept.clamp(min=1).float() * total, torch.ones_like(weights))
    per_rollout = torch.where(usable, weights / denominator, torch.zeros_like(weights))
    return keep.float() * per_rollout.unsqueeze(-1)


def selective_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    method: str = "soft_or",
    ratio: float = 0.5,
    entropy_clip_quantile: float = 0.98,
    generator: torch.Generator | None = None,
    rollout_weights: torch.Tensor | None = None,
    weight_sum: torch.Tensor | float | None = None,
    selection_divergence: str = "reverse_kl",
    divergence_clip_quantile: float = 1.0,
    vocab_size: int | None = None,
) -> SelectiveLossOutput:
    """
    TRL's generalised-JSD distillation loss (`_chunked_divergence_loss` of `trl.trainer.distillation_trainer`, same
    positional arguments) restricted to the tokens a TIP rule keeps.

    1. One chunked pass without gradient scores every completion token: normalised student entropy, reverse KL,
       forward KL ([`token_stats`]).
    2. [`select_tokens`] keeps `max(1, ⌊ratio·m_i⌋)` tokens of each rollout. The rules that rank by divergence
       (`"soft_or"`, `"divergence_topk"`) use the reverse KL, or with `selection_divergence="jsd"` the bounded
       JSD / ln 2 of a second chunked pass without gradient ([`normalized_jsd`]), which soft-OR then uses as δ̂
       as it is; `divergence_clip_quantile` < 1 clips the reverse KL at its batch quantile before soft-OR's min-max.
    3. The divergence of the kept tokens reuses the pass-1 statistics; its backward (TRL's) runs over the kept rows
       only, so unkept tokens cost no `lm_head` backward.

    Rules that need no divergence to select (`random`, `entropy_sample`, `entropy_topk`) with `ratio < 1` reorder
    this: pass 1 scores the student's entropy alone ([`student_entropy`]), and both heads are projected for the
    statistics of the kept tokens only, so unkept tokens cost no teacher `lm_head` projection either (the teacher's
    trunk has already run on every token); the student's head is projected once more, on the kept tokens. Selection,
    loss and gradients are those of the full pass, up to float32 summation order.

    The loss is `Σ_kept divergence / num_items_in_batch` (the kept-token count of the global batch, for
    gradient-accumulation- and multi-process-correct normalisation), or the mean over kept tokens when
    `num_items_in_batch` is `None`. With `method="all"` it equals TRL's loss bit for bit, gradients included.

    With `rollout_weights` `w` (one per rollout, PACED), the loss is instead `Σ_i w_i ℓ_i / weight_sum`, where `ℓ_i` is
    the mean divergence over rollout `i`'s kept tokens and `weight_sum` is `Σ w` over the global batch (the local
    `Σ_i w_i` when `None`); `num_items_in_batch` is then unused. Only kept tokens of rollouts with `w_i > 0` pay the
    backward pass. When every weight is zero the loss is an exact zero whose gradient is zero (one token stays in the
    graph so that every parameter still receives a gradient, as distributed training expects).

    With `vocab_size`, both heads are compared over their first `vocab_size` rows only (views of the weights, no
    copy): the rows a shared tokenizer can produce when the two heads are padded to different sizes. The normalised
    entropy is then `H / ln(vocab_size)`.

    Batch statistics of the rules are local to the tensors passed in: no cross-process communication happens here,
    so it is safe inside a DDP/FSDP-wrapped forward.
    """
    # As in TRL: gather FSDP2-sharded heads once, cast to the hidden-states dtype.
    if isinstance(student_lm_head_weight, torch.distributed.tensor.DTensor):
        student_lm_head_weight = student_lm_head_weight.full_tensor().to(student_hidden_states.dtype)
        if student_lm_head_bias is not None:
            student_lm_head_bias = student_lm_head_bias.full_tensor()
    if isinstance(teacher_lm_head_weight, torch.distributed.tensor.DTensor):
        teacher_lm_head_weight = teacher_lm_head_weight.full_tensor().to(teacher_hidden_states.dtype)
        if teacher_lm_head_bias is not None:
            teacher_lm_head_bias = teacher_lm_head_bias.full_tensor()
    student_lm_head_weight, student_lm_head_bias = shared_vocab_head(
        student_lm_head_weight, student_lm_head_bias, vocab_size
    )
    teacher_lm_head_weight, teacher_lm_head_bias = shared_vocab_head(
        teacher_lm_head_weight, teacher_lm_head_bias, vocab_size
    )
    logits_kwargs = {
        "student_bias": student_lm_head_bias,
        "teacher_bias": teacher_lm_head_bias,
        "temperature": temperature,
        "student_logit_scale": student_logit_scale,
        "student_final_logit_softcapping": student_final_logit_softcapping,
        "teacher_logit_scale": teacher_logit_scale,
        "teacher_final_logit_softcapping": teacher_final_logit_softcapping,
    }

    mask = completion_mask != 0
    valid = mask.reshape(-1)
    h_s = student_hidden_states.reshape(-1, student_hidden_states.size(-1))
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))
    # Rows scored: like TRL, only completion positions where Triton runs, every position elsewhere (fixed tile shapes
    # for compiled backends). Following TRL's choice also keeps method="all" bit-identical to TRL on every device.
    compact = use_triton(student_hidden_states.device)
    scored_rows = valid.nonzero().squeeze(-1) if compact else torch.arange(valid.numel(), device=valid.device)

    def per_position(values, rows=scored_rows, fill=0.0):
        if rows.numel() == valid.numel():
            return values.reshape(mask.shape)
        return values.new_full((valid.numel(),), fill).index_copy_(0, rows, values).reshape(mask.shape)

    def student_rows(rows):
        return h_s.detach() if rows.numel() == h_s.shape[0] else h_s[rows].detach()

    if selection_divergence not in SELECTION_DIVERGENCES:
        raise ValueError(
            f"selection_divergence must be one of {', '.join(SELECTION_DIVERGENCES)}, got {selection_divergence!r}."
        )
    divergence_hat = None
    # At ratio 1 every token is kept: scoring the student first would only add a pass.
    if method in STUDENT_SIDE_METHODS and ratio < 1.0:
        entropy, entropy_nats = student_entropy(
            student_rows(scored_rows),
            student_lm_head_weight,
            student_lm_head_bias,
            temperature,
            student_logit_scale,
            student_final_logit_softcapping,
        )
        entropy, entropy_nats = per_position(entropy), per_position(entropy_nats)
        # These rules read no divergence: a placeholder of the right shape.
        keep = select_tokens(
            entropy,
            torch.zeros_like(entropy),
            mask,
            method=method,
            ratio=ratio,
            entropy_clip_quantile=entropy_clip_quantile,
            generator=generator,
        )
        stats_rows = keep.reshape(-1).nonzero().squeeze(-1)
        stats = token_stats(
            student_rows(stats_rows), student_lm_head_weight, h_t[stats_rows], teacher_lm_head_weight, **logits_kwargs
        )
        reverse_kl = per_position(stats.reverse_kl, stats_rows, math.nan)
    else:
        stats_rows = scored_rows
        stats = token_stats(
            student_rows(scored_rows),
            student_lm_head_weight,
            h_t if not compact else h_t[scored_rows],
            teacher_lm_head_weight,
            **logits_kwargs,
        )
        entropy, reverse_kl = per_position(stats.entropy), per_position(stats.reverse_kl)
        entropy_nats = per_position(stats.entropy_nats)
        ranked_divergence, normalization = reverse_kl, "min_max"
        if selection_divergence == "jsd" and method in ("soft_or", "divergence_topk"):
            rows = scored_rows if compact else slice(None)
            ranked_divergence = per_position(
                normalized_jsd(h_s[rows].detach(), student_lm_head_weight, h_t[rows], teacher_lm_head_weight, stats,
                               **logits_kwargs)
            )
            normalization = "bounded"
        keep = select_tokens(
            entropy,
            ranked_divergence,
            mask,
            method=method,
            ratio=ratio,
            forward_kl=per_position(stats.forward_kl) if method == "overconfident" else None,
            entropy_clip_quantile=entropy_clip_quantile,
            generator=generator,
            divergence_clip_quantile=divergence_clip_quantile,
            divergence_normalization=normalization,
        )
        if method == "soft_or":
            with torch.no_grad():
                divergence_hat = normalized_divergence(
                    ranked_divergence, mask, divergence_clip_quantile, normalization
                )
    # Where each loss row's statistics sit in `stats`.
    every_stat = stats_rows.numel() == valid.numel()

    coefficients = None
    if rollout_weights is not None:
        coefficients = rollout_token_coefficients(keep, rollout_weights, weight_sum).reshape(-1)
        loss_rows = coefficients.nonzero().squeeze(-1)
        if loss_rows.numel() == 0:
            # A batch without weight: keep one token in the graph with coefficient 0, so that the loss is an exact zero
            # with zero gradients rather than a constant that cannot be backpropagated.
            loss_rows = keep.reshape(-1).nonzero().squeeze(-1)[:1]
        stat_index = loss_rows if every_stat else torch.searchsorted(stats_rows, loss_rows)
    elif method == "all":
        loss_rows = scored_rows
        stat_index = torch.arange(scored_rows.numel(), device=scored_rows.device)
    else:
        loss_rows = keep.reshape(-1).nonzero().squeeze(-1)
        stat_index = loss_rows if every_stat else torch.searchsorted(stats_rows, loss_rows)
    every_row = loss_rows.numel() == h_s.shape[0]
    divergence = divergence_from_stats(
        stat_index,
        h_s if every_row else h_s[loss_rows],
        student_lm_head_weight,
        h_t if every_row else h_t[loss_rows],
        teacher_lm_head_weight,
        stats,
        beta,
        **logits_kwargs,
    )
    if coefficients is not None:
        # Σ_i w_i ℓ_i / W as one weighted sum over tokens: the coefficients already hold w_i / (k_i · W).
        loss = (divergence * coefficients[loss_rows].to(divergence.dtype)).sum()
    else:
        if method == "all" and not compact:
            divergence = divergence.masked_fill(~valid, 0)
        loss = divergence.sum()
        if num_items_in_batch is None:
            # Clamped so a batch without completion tokens reduces to a finite zero rather than 0 / 0.
            loss = loss / keep.sum().clamp(min=1)
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch

    entropy_sum = entropy_nats.masked_fill(~mask, 0).sum()
    return SelectiveLossOutput(
        loss=loss,
        entropy_sum=entropy_sum,
        num_valid=mask.sum(),
        mask=mask,
        keep=keep,
        entropy=entropy,
        reverse_kl=reverse_kl,
        divergence_hat=divergence_hat,
    )
