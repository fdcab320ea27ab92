"""
The selective distillation loss with a served teacher: TIP's token selection and the trained divergence, on the
teacher's top-k log-probabilities (what a `trl vllm-serve` teacher returns) instead of its full-vocabulary logits.

A short pipeline of named steps, as [`~trl_tip.losses.selective_divergence_loss`]: gather the completion rows and
the teacher's sparse support, score and select (the student's exact entropy; the divergences on the support), pick the
loss rows, take the divergence on them, reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunked_stats import student_entropy
from .losses import (
    SELECTION_DIVERGENCES,
    STUDENT_SIDE_METHODS,
    SelectiveLossOutput,
    _gathered_head,
    rollout_token_coefficients,
)
from .selection import normalized_divergence, select_tokens
from .sparse_divergence import sparse_divergence, sparse_support, student_support_logprobs


@dataclass
class ServedTeacherLogprobs:
    """
    What a teacher server returned for a batch of completions, on the `(B, T)` completion grid (see
    `trl_tip.served_teacher`).

    Attributes:
        topk_ids (`torch.LongTensor`): `(B, T, k)` the teacher's top-k token ids at each completion position.
        topk_logprobs (`torch.Tensor`): `(B, T, k)` their log-probabilities (`-inf` where fewer were returned).
        sampled_logprobs (`torch.Tensor`): `(B, T)` the teacher's log-probability of the completion's token.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    sampled_logprobs: torch.Tensor


@dataclass
class _SparseRows:
    """The completion positions (flattened indices `rows` of the `(B, T)` grid), the student's hidden states and
    head, and the teacher's sparse support at those positions."""

    mask: torch.Tensor
    rows: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scaling: dict
    support_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    support_mask: torch.Tensor
    add_tail: bool

    def on_grid(self, values, fill=0.0, at=None):
        """Values of the positions `rows[at]` (all of them when `at` is `None`) on the `(B, T)` grid."""
        at = torch.arange(self.rows.numel(), device=self.rows.device) if at is None else at
        grid = values.new_full((self.mask.numel(),), fill)
        return grid.index_copy_(0, self.rows[at], values).reshape(self.mask.shape)

    def student_logprobs(self, at, detach: bool = False):
        """The student's log-probabilities on the support at the positions `rows[at]`, projected in chunks."""
        hidden = self.hidden[self.rows[at]]
        return student_support_logprobs(
            hidden.detach() if detach else hidden, self.weight, self.support_ids[at], self.bias, **self.scaling
        )

    def divergence(self, student_logprobs, at, beta):
        """Per-position generalised JSD (`beta`) on the support, with the tail bucket when `add_tail`."""
        return sparse_divergence(
            student_logprobs, self.teacher_logprobs[at], self.support_mask[at], beta, self.add_tail
        )


def _sparse_rows(hidden_states, weight, bias, completion_ids, completion_mask, teacher, beta, scaling, add_tail):
    mask = completion_mask != 0
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    weight, bias = _gathered_head(weight, bias, hidden_states.dtype)
    k = teacher.topk_ids.shape[-1]
    support_ids, teacher_logprobs, support_mask = sparse_support(
        teacher.topk_ids.reshape(-1, k)[rows],
        teacher.topk_logprobs.reshape(-1, k)[rows].float(),
        completion_ids.reshape(-1)[rows],
        teacher.sampled_logprobs.reshape(-1)[rows].float(),
        beta,
    )
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    return _SparseRows(
        mask, rows, hidden, weight, bias, scaling, support_ids, teacher_logprobs, support_mask, add_tail
    )


def _score_and_select(tokens: _SparseRows, entropy, selection: dict, selection_divergence, divergence_clip_quantile):
    """
    The kept tokens, the reverse KL at every position when it was computed for the selection (else `None`), and
    soft-OR's normalised divergence axis. The rules that read the student alone never project the support.
    """
    method, ratio = selection["method"], selection["ratio"]
    if method in STUDENT_SIDE_METHODS and ratio < 1.0:
        return select_tokens(entropy, torch.zeros_like(entropy), tokens.mask, **selection), None, None
    every = torch.arange(tokens.rows.numel(), device=tokens.rows.device)
    with torch.no_grad():
        student_logprobs = tokens.student_logprobs(every, detach=True)
        reverse_kl = tokens.divergence(student_logprobs, every, 1.0)
        ranked, normalization = tokens.on_grid(reverse_kl), "min_max"
        if selection_divergence == "jsd" and method in ("soft_or", "divergence_topk"):
            ranked = tokens.on_grid(tokens.divergence(student_logprobs, every, 0.5) / math.log(2))
            normalization = "bounded"
        forward_kl = None
        if method == "overconfident":
            forward_kl = tokens.on_grid(tokens.divergence(student_logprobs, every, 0.0))
    keep = select_tokens(
        entropy,
        ranked,
        tokens.mask,
        forward_kl=forward_kl,
        divergence_clip_quantile=divergence_clip_quantile,
        divergence_normalization=normalization,
        **selection,
    )
    divergence_hat = None
    if method == "soft_or":
        with torch.no_grad():
            divergence_hat = normalized_divergence(ranked, tokens.mask, divergence_clip_quantile, normalization)
    return keep, reverse_kl, divergence_hat


def _loss_positions(tokens: _SparseRows, keep, rollout_weights, weight_sum):
    """The loss rows as indices into `tokens.rows`, and PACED's per-token coefficients (or `None`)."""
    kept = keep.reshape(-1)[tokens.rows]
    if rollout_weights is None:
        return kept.nonzero().squeeze(-1), None
    coefficients = rollout_token_coefficients(keep, rollout_weights, weight_sum).reshape(-1)[tokens.rows]
    loss_at = coefficients.nonzero().squeeze(-1)
    if loss_at.numel() == 0:
        # As in `losses._loss_rows`: one token in the graph with coefficient 0, an exact zero with zero gradients.
        loss_at = kept.nonzero().squeeze(-1)[:1]
    return loss_at, coefficients


def _reduce(divergence, keep, loss_at, coefficients, num_items_in_batch):
    """The scalar loss: PACED's weighted mean over rollouts, or the sum over kept tokens over their count."""
    if coefficients is not None:
        return (divergence * coefficients[loss_at].to(divergence.dtype)).sum()
    if num_items_in_batch is None:
        return divergence.sum() / keep.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(divergence.device)
    return divergence.sum() / num_items_in_batch


def selective_sparse_divergence_loss(
    student_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    teacher: ServedTeacherLogprobs,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
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
    add_tail: bool = True,
) -> SelectiveLossOutput:
    """
    [`~trl_tip.losses.selective_divergence_loss`] for a teacher known through its top-k log-probabilities only (a
    served teacher).

    What is exact and what is not:

    - the student's normalised entropy is the full-vocabulary one, from the student's hidden states
      ([`~trl_tip.chunked_stats.student_entropy`], the same values as with a local teacher), so the rules that select
      from the student alone (`random`, `entropy_sample`, `entropy_topk`) keep the tokens they keep with a local
      teacher;
    - the divergences the other rules rank by (reverse KL for `soft_or` / `divergence_topk`, forward KL for
      `overconfident`, JSD / ln 2 for `selection_divergence="jsd"`) and the trained divergence (TRL's `beta`) are taken
      on the sparse support of [`~trl_tip.sparse_divergence.sparse_support`] with a tail bucket, as TRL's
      `ServerDistillationTrainer` takes its loss: lower bounds of the full-vocabulary divergences, equal to them when
      the support covers the vocabulary.

    Only the kept tokens pay the backward pass; the student's logits are projected in chunks of token rows
    ([`~trl_tip.sparse_divergence.student_support_logprobs`]). Normalisation as in
    [`~trl_tip.losses.selective_divergence_loss`]: `Σ_kept divergence / num_items_in_batch`, the mean over kept tokens
    when it is `None`, or PACED's weighted mean over rollouts with `rollout_weights`. With `method="all"`, one process
    and one micro-batch this is TRL's `ServerDistillationTrainer` loss.
    """
    if selection_divergence not in SELECTION_DIVERGENCES:
        raise ValueError(
            f"selection_divergence must be one of {', '.join(SELECTION_DIVERGENCES)}, got {selection_divergence!r}."
        )
    scaling = {"temperature": temperature, "logit_scale": student_logit_scale,
               "final_logit_softcapping": student_final_logit_softcapping}
    tokens = _sparse_rows(student_hidden_states, student_lm_head_weight, student_lm_head_bias, completion_ids,
                          completion_mask, teacher, beta, scaling, add_tail)
    mask, rows = tokens.mask, tokens.rows
    with torch.no_grad():
        entropy, entropy_nats = student_entropy(tokens.hidden[rows].detach(), tokens.weight, tokens.bias, temperature,
                                                student_logit_scale, student_final_logit_softcapping)
    entropy, entropy_nats = tokens.on_grid(entropy), tokens.on_grid(entropy_nats)
    selection = {"method": method, "ratio": ratio, "entropy_clip_quantile": entropy_clip_quantile,
                 "generator": generator}
    keep, reverse_kl, divergence_hat = _score_and_select(tokens, entropy, selection, selection_divergence,
                                                         divergence_clip_quantile)
    loss_at, coefficients = _loss_positions(tokens, keep, rollout_weights, weight_sum)
    if loss_at.numel() == 0 and rows.numel() == 0:
        # No completion token at all: a zero that still reaches every parameter of the head.
        zero = (tokens.hidden[:1].sum() * 0.0 + tokens.weight.sum() * 0.0).float()
        empty = entropy.new_full(mask.shape, math.nan)
        return SelectiveLossOutput(zero, entropy_nats.sum(), mask.sum(), mask, keep, entropy, empty, divergence_hat)
    student_logprobs = tokens.student_logprobs(loss_at)
    divergence = tokens.divergence(student_logprobs, loss_at, beta)
    if reverse_kl is None:
        # The entropy-only rules: the reverse KL (for the logged metrics) on the kept tokens only.
        with torch.no_grad():
            reverse = (divergence.detach() if beta == 1.0
                       else tokens.divergence(student_logprobs.detach(), loss_at, 1.0))
        reverse_kl = tokens.on_grid(reverse, math.nan, loss_at)
    else:
        reverse_kl = tokens.on_grid(reverse_kl)
    return SelectiveLossOutput(
        loss=_reduce(divergence, keep, loss_at, coefficients, num_items_in_batch),
        entropy_sum=entropy_nats.masked_fill(~mask, 0).sum(),
        num_valid=mask.sum(),
        mask=mask,
        keep=keep,
        entropy=entropy,
        reverse_kl=reverse_kl,
        divergence_hat=divergence_hat,
    )
