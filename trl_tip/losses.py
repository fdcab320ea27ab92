"""The distillation loss over selected tokens, with the signature of TRL's chunked divergence loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._trl_compat import use_triton
from .chunked_stats import (
    TokenStats,
    divergence_from_stats,
    normalized_jsd,
    shared_vocab_head,
    student_entropy,
    token_stats,
)
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

    1. Score: one chunked pass without gradient scores every completion token: normalised student entropy, reverse KL,
       forward KL ([`token_stats`]).
    2. Select: [`select_tokens`] keeps `max(1, ⌊ratio·m_i⌋)` tokens of each rollout. The rules that rank by divergence
       (`"soft_or"`, `"divergence_topk"`) use the reverse KL, or with `selection_divergence="jsd"` the bounded
       JSD / ln 2 of a second chunked pass without gradient ([`normalized_jsd`]), which soft-OR then uses as δ̂
       as it is; `divergence_clip_quantile` < 1 clips the reverse KL at its batch quantile before soft-OR's min-max.
    3. Per-row loss: the divergence of the kept tokens reuses the pass-1 statistics; its backward (TRL's) runs over the
       kept rows only, so unkept tokens cost no `lm_head` backward.
    4. Reduce: the per-row divergences are summed and normalised (below).

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
    heads = _LmHeads.prepare(
        student_lm_head_weight,
        student_lm_head_bias,
        student_hidden_states.dtype,
        teacher_lm_head_weight,
        teacher_lm_head_bias,
        teacher_hidden_states.dtype,
        vocab_size,
        temperature=temperature,
        student_logit_scale=student_logit_scale,
        student_final_logit_softcapping=student_final_logit_softcapping,
        teacher_logit_scale=teacher_logit_scale,
        teacher_final_logit_softcapping=teacher_final_logit_softcapping,
    )
    tokens = _TokenRows.of(student_hidden_states, teacher_hidden_states, completion_mask)
    if selection_divergence not in SELECTION_DIVERGENCES:
        raise ValueError(
            f"selection_divergence must be one of {', '.join(SELECTION_DIVERGENCES)}, got {selection_divergence!r}."
        )
    selection = {"method": method, "ratio": ratio, "entropy_clip_quantile": entropy_clip_quantile,
                 "generator": generator}
    # At ratio 1 every token is kept: scoring the student first would only add a pass.
    if method in STUDENT_SIDE_METHODS and ratio < 1.0:
        scores, keep = _score_and_select_from_student(tokens, heads, selection)
    else:
        scores, keep = _score_and_select_from_both(
            tokens, heads, selection, selection_divergence, divergence_clip_quantile
        )
    loss_rows, stat_index, coefficients = _loss_rows(tokens, scores, keep, method, rollout_weights, weight_sum)
    divergence = _row_divergence(tokens, heads, scores, loss_rows, stat_index, beta)
    loss = _reduce(divergence, tokens, keep, loss_rows, coefficients, method, num_items_in_batch)
    return SelectiveLossOutput(
        loss=loss,
        entropy_sum=scores.entropy_nats.masked_fill(~tokens.mask, 0).sum(),
        num_valid=tokens.mask.sum(),
        mask=tokens.mask,
        keep=keep,
        entropy=scores.entropy,
        reverse_kl=scores.reverse_kl,
        divergence_hat=scores.divergence_hat,
    )


# ---- The steps of `selective_divergence_loss` ----


@dataclass
class _LmHeads:
    """Both `lm_head`s, gathered and cut to the shared vocabulary, with the keyword arguments of every projection."""

    student_weight: torch.Tensor
    teacher_weight: torch.Tensor
    # `student_bias`, `teacher_bias`, `temperature`, and each side's logit scale and final softcapping.
    logits_kwargs: dict

    @classmethod
    def prepare(
        cls,
        student_weight,
        student_bias,
        student_dtype,
        teacher_weight,
        teacher_bias,
        teacher_dtype,
        vocab_size,
        **scaling,
    ) -> _LmHeads:
        # As in TRL: gather FSDP2-sharded heads once, cast to the hidden-states dtype.
        student_weight, student_bias = _gathered_head(student_weight, student_bias, student_dtype)
        teacher_weight, teacher_bias = _gathered_head(teacher_weight, teacher_bias, teacher_dtype)
        student_weight, student_bias = shared_vocab_head(student_weight, student_bias, vocab_size)
        teacher_weight, teacher_bias = shared_vocab_head(teacher_weight, teacher_bias, vocab_size)
        biases = {"student_bias": student_bias, "teacher_bias": teacher_bias}
        return cls(student_weight, teacher_weight, {**biases, **scaling})


def _gathered_head(weight, bias, dtype):
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


@dataclass
class _TokenRows:
    """The batch flattened to token rows, and the rows the statistics passes score."""

    mask: torch.Tensor  # (B, T) completion tokens
    valid: torch.Tensor  # the mask, flattened
    student_hidden: torch.Tensor  # (B·T, H_s)
    teacher_hidden: torch.Tensor  # (B·T, H_t)
    compact: bool
    scored_rows: torch.Tensor

    @classmethod
    def of(cls, student_hidden_states, teacher_hidden_states, completion_mask) -> _TokenRows:
        mask = completion_mask != 0
        valid = mask.reshape(-1)
        # Rows scored: like TRL, only completion positions where Triton runs, every position elsewhere (fixed tile
        # shapes for compiled backends). Following TRL's choice also keeps method="all" bit-identical to TRL on every
        # device.
        compact = use_triton(student_hidden_states.device)
        scored_rows = valid.nonzero().squeeze(-1) if compact else torch.arange(valid.numel(), device=valid.device)
        return cls(
            mask=mask,
            valid=valid,
            student_hidden=student_hidden_states.reshape(-1, student_hidden_states.size(-1)),
            teacher_hidden=teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1)),
            compact=compact,
            scored_rows=scored_rows,
        )

    def per_position(self, values, rows=None, fill=0.0):
        """Scatter per-row `values` of `rows` (the scored rows by default) back to the `(B, T)` grid."""
        rows = self.scored_rows if rows is None else rows
        if rows.numel() == self.valid.numel():
            return values.reshape(self.mask.shape)
        return values.new_full((self.valid.numel(),), fill).index_copy_(0, rows, values).reshape(self.mask.shape)

    def detached_student(self, rows):
        hidden = self.student_hidden
        return hidden.detach() if rows.numel() == hidden.shape[0] else hidden[rows].detach()


@dataclass
class _Scores:
    """The per-token statistics the rules select by, and the rows of the batch that `stats` holds."""

    stats: TokenStats
    stats_rows: torch.Tensor
    entropy: torch.Tensor
    entropy_nats: torch.Tensor
    reverse_kl: torch.Tensor
    divergence_hat: torch.Tensor | None = None


def _score_and_select_from_student(tokens: _TokenRows, heads: _LmHeads, selection: dict):
    """Student-side rules: score the student's entropy, select, then take both heads' statistics on kept rows only."""
    student_kwargs = heads.logits_kwargs
    entropy, entropy_nats = student_entropy(
        tokens.detached_student(tokens.scored_rows),
        heads.student_weight,
        student_kwargs["student_bias"],
        student_kwargs["temperature"],
        student_kwargs["student_logit_scale"],
        student_kwargs["student_final_logit_softcapping"],
    )
    entropy, entropy_nats = tokens.per_position(entropy), tokens.per_position(entropy_nats)
    # These rules read no divergence: a placeholder of the right shape.
    keep = select_tokens(entropy, torch.zeros_like(entropy), tokens.mask, **selection)
    stats_rows = keep.reshape(-1).nonzero().squeeze(-1)
    stats = token_stats(
        tokens.detached_student(stats_rows),
        heads.student_weight,
        tokens.teacher_hidden[stats_rows],
        heads.teacher_weight,
        **heads.logits_kwargs,
    )
    reverse_kl = tokens.per_position(stats.reverse_kl, stats_rows, math.nan)
    return _Scores(stats, stats_rows, entropy, entropy_nats, reverse_kl), keep


def _score_and_select_from_both(
    tokens: _TokenRows, heads: _LmHeads, selection: dict, selection_divergence: str, divergence_clip_quantile: float
):
    """Every other rule: both heads' statistics on every scored row, then the selection, then soft-OR's δ̂."""
    scored_rows, method = tokens.scored_rows, selection["method"]
    stats = token_stats(
        tokens.detached_student(scored_rows),
        heads.student_weight,
        tokens.teacher_hidden if not tokens.compact else tokens.teacher_hidden[scored_rows],
        heads.teacher_weight,
        **heads.logits_kwargs,
    )
    scores = _Scores(
        stats,
        scored_rows,
        entropy=tokens.per_position(stats.entropy),
        entropy_nats=tokens.per_position(stats.entropy_nats),
        reverse_kl=tokens.per_position(stats.reverse_kl),
    )
    ranked_divergence, normalization = scores.reverse_kl, "min_max"
    if selection_divergence == "jsd" and method in ("soft_or", "divergence_topk"):
        rows = scored_rows if tokens.compact else slice(None)
        ranked_divergence = tokens.per_position(
            normalized_jsd(tokens.student_hidden[rows].detach(), heads.student_weight, tokens.teacher_hidden[rows],
                           heads.teacher_weight, stats, **heads.logits_kwargs)
        )
        normalization = "bounded"
    keep = select_tokens(
        scores.entropy,
        ranked_divergence,
        tokens.mask,
        forward_kl=tokens.per_position(stats.forward_kl) if method == "overconfident" else None,
        divergence_clip_quantile=divergence_clip_quantile,
        divergence_normalization=normalization,
        **selection,
    )
    if method == "soft_or":
        with torch.no_grad():
            scores.divergence_hat = normalized_divergence(
                ranked_divergence, tokens.mask, divergence_clip_quantile, normalization
            )
    return scores, keep


def _loss_rows(tokens: _TokenRows, scores: _Scores, keep, method, rollout_weights, weight_sum):
    """
    The rows that pay the divergence and its backward, where their statistics sit in `scores.stats`, and PACED's
    per-token coefficients (`None` without rollout weights).
    """
    # Where each loss row's statistics sit in `stats`.
    every_stat = scores.stats_rows.numel() == tokens.valid.numel()
    coefficients = None
    if rollout_weights is not None:
        coefficients = rollout_token_coefficients(keep, rollout_weights, weight_sum).reshape(-1)
        loss_rows = coefficients.nonzero().squeeze(-1)
        if loss_rows.numel() == 0:
            # A batch without weight: keep one token in the graph with coefficient 0, so that the loss is an exact zero
            # with zero gradients rather than a constant that cannot be backpropagated.
            loss_rows = keep.reshape(-1).nonzero().squeeze(-1)[:1]
        stat_index = loss_rows if every_stat else torch.searchsorted(scores.stats_rows, loss_rows)
    elif method == "all":
        loss_rows = tokens.scored_rows
        stat_index = torch.arange(loss_rows.numel(), device=loss_rows.device)
    else:
        loss_rows = keep.reshape(-1).nonzero().squeeze(-1)
        stat_index = loss_rows if every_stat else torch.searchsorted(scores.stats_rows, loss_rows)
    return loss_rows, stat_index, coefficients


def _row_divergence(tokens: _TokenRows, heads: _LmHeads, scores: _Scores, loss_rows, stat_index, beta):
    """The differentiable divergence of each loss row, from the scoring pass's statistics (TRL's backward)."""
    every_row = loss_rows.numel() == tokens.student_hidden.shape[0]
    return divergence_from_stats(
        stat_index,
        tokens.student_hidden if every_row else tokens.student_hidden[loss_rows],
        heads.student_weight,
        tokens.teacher_hidden if every_row else tokens.teacher_hidden[loss_rows],
        heads.teacher_weight,
        scores.stats,
        beta,
        **heads.logits_kwargs,
    )


def _reduce(divergence, tokens: _TokenRows, keep, loss_rows, coefficients, method, num_items_in_batch):
    """The scalar loss: PACED's weighted mean over rollouts, or the sum over kept tokens over their count."""
    if coefficients is not None:
        # Σ_i w_i ℓ_i / W as one weighted sum over tokens: the coefficients already hold w_i / (k_i · W).
        return (divergence * coefficients[loss_rows].to(divergence.dtype)).sum()
    if method == "all" and not tokens.compact:
        divergence = divergence.masked_fill(~tokens.valid, 0)
    loss = divergence.sum()
    if num_items_in_batch is None:
        # Clamped so a batch without completion tokens reduces to a finite zero rather than 0 / 0.
        return loss / keep.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
