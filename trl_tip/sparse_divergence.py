"""
The divergence between a student and a teacher that is known only through a server: per completion token, the
teacher's top-k log-probabilities (ids and values) and its log-probability of the sampled token, as
`VLLMClient.get_sequence_logprobs` returns them.

The divergence is taken on a sparse support, as TRL's `ServerDistillationTrainer` takes it: the support tokens plus a
tail bucket that holds the rest of the probability mass, so that both sides are distributions over `|support| + 1`
outcomes. Merging outcomes never increases a KL divergence, so the sparse reverse and forward KL are lower bounds of
the full-vocabulary ones, and equal them once the support holds every token the two distributions put mass on.

The student's side is computed from hidden states and the `lm_head` weight in chunks of token rows, so that no
`(tokens x V)` float32 tensor exists for the whole batch; the loss recomputes each chunk's logits in its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._trl_compat import add_tail_bucket, sparse_jsd, torch_transform


# Token rows whose `(rows x V)` float32 logits exist at once on the student's side (`V` = 151,936: 600 MB).
SUPPORT_CHUNK_ROWS = 1024


def sparse_support(
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_sampled_logprobs: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The tokens on which a served teacher's divergence is taken, TRL's `ServerDistillationTrainer` rule extended to
    top-k support for every `beta`.

    - `beta == 0` (forward KL): the teacher's top-k tokens.
    - `beta > 0`: the teacher's top-k tokens and the sampled token (masked where it is one of the top-k already),
      except for `beta == 1` with `k == 1`, where the support is the sampled token alone. At `k == 1` this is TRL's
      top-1 support for every `beta` (TRL accepts no other `k` when `beta > 0`).

    Args:
        teacher_topk_ids (`torch.LongTensor`): `(N, k)` the teacher's top-k token ids, by descending probability.
        teacher_topk_logprobs (`torch.Tensor`): `(N, k)` their log-probabilities; `-inf` where the server returned
            fewer than `k`.
        sampled_ids (`torch.LongTensor`): `(N,)` the completion's tokens.
        teacher_sampled_logprobs (`torch.Tensor`): `(N,)` the teacher's log-probability of each.
        beta (`float`): TRL's generalised-JSD interpolation (0 forward KL, 1 reverse KL).

    Returns:
        `tuple`: support ids `(N, S)`, the teacher's log-probabilities on them `(N, S)`, and the mask of the support
        entries that count `(N, S)` (duplicates and missing top-k entries are masked out).
    """
    k = teacher_topk_ids.shape[-1]
    topk_mask = torch.isfinite(teacher_topk_logprobs)
    if beta == 0:
        return teacher_topk_ids, teacher_topk_logprobs, topk_mask
    sampled_ids, teacher_sampled_logprobs = sampled_ids.unsqueeze(-1), teacher_sampled_logprobs.unsqueeze(-1)
    if beta == 1 and k == 1:
        return sampled_ids, teacher_sampled_logprobs, torch.ones_like(sampled_ids, dtype=torch.bool)
    duplicate = ((teacher_topk_ids == sampled_ids) & topk_mask).any(dim=-1, keepdim=True)
    ids = torch.cat([teacher_topk_ids, torch.where(duplicate, torch.zeros_like(sampled_ids), sampled_ids)], dim=-1)
    logprobs = torch.cat([teacher_topk_logprobs, teacher_sampled_logprobs], dim=-1)
    return ids, logprobs, torch.cat([topk_mask, ~duplicate], dim=-1)


def sparse_distribution(support_logprobs: torch.Tensor, support_mask: torch.Tensor, add_tail: bool = True):
    """
    Log-probabilities on the support made a distribution: with `add_tail`, a last entry log(1 − Σ p) for the mass
    outside the support (TRL's `_add_tail_bucket`); without, the support renormalised to sum to one. Masked entries
    are `-inf`.

    Returns:
        `tuple`: `(N, S + 1)` log-probabilities and mask with the tail, or `(N, S)` without.
    """
    support_logprobs = support_logprobs.masked_fill(~support_mask, float("-inf"))
    if add_tail:
        return add_tail_bucket(support_logprobs, support_mask)
    return support_logprobs - torch.logsumexp(support_logprobs, dim=-1, keepdim=True), support_mask


def sparse_divergence(
    student_support_logprobs: torch.Tensor,
    teacher_support_logprobs: torch.Tensor,
    support_mask: torch.Tensor,
    beta: float,
    add_tail: bool = True,
) -> torch.Tensor:
    """
    Per-token generalised JSD (TRL's `beta`: 0 forward KL, 1 reverse KL) between the student and the teacher on a
    sparse support ([`sparse_support`]), each made a distribution by [`sparse_distribution`].

    Args:
        student_support_logprobs (`torch.Tensor`): `(N, S)` the student's full-vocabulary log-probabilities of the
            support tokens (differentiable).
        teacher_support_logprobs (`torch.Tensor`): `(N, S)` the teacher's.
        support_mask (`torch.BoolTensor`): `(N, S)` the support entries that count.
        beta (`float`): the divergence.
        add_tail (`bool`): a tail bucket for the mass outside the support (TRL's default), or renormalise.

    Returns:
        `torch.Tensor`: `(N,)` the divergence of each token.
    """
    student, mask = sparse_distribution(student_support_logprobs, support_mask, add_tail)
    teacher, _ = sparse_distribution(teacher_support_logprobs.to(student.dtype), support_mask, add_tail)
    return sparse_jsd(student, teacher, beta, mask).sum(dim=-1)


def _support_logprobs_chunk(hidden, weight, bias, support_ids, logit_scale, softcap, inv_t):
    logits = F.linear(hidden, weight, bias).float()
    logits = torch_transform(logits, logit_scale, softcap or 1.0, inv_t, softcap is not None)
    return torch.log_softmax(logits, dim=-1).gather(-1, support_ids)


def student_support_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    support_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_rows: int = SUPPORT_CHUNK_ROWS,
) -> torch.Tensor:
    """
    The student's log-probabilities of the support tokens, `log_softmax(transform(h W^T + b))[support]`, with TRL's
    logit post-processing (scale, final softcapping, temperature), `chunk_rows` token rows at a time.

    With gradient enabled, each chunk is checkpointed: its `(chunk_rows x V)` logits are freed after the forward and
    recomputed in the backward, so the memory the loss holds is `(N x S)`, not `(N x V)`.

    Args:
        hidden (`torch.Tensor`): `(N, H)` hidden states before the `lm_head`.
        weight (`torch.Tensor`): `(V, H)` the `lm_head` weight.
        support_ids (`torch.LongTensor`): `(N, S)` token ids.
        bias, temperature, logit_scale, final_logit_softcapping: the `lm_head` bias and TRL's logit post-processing.
        chunk_rows (`int`): token rows projected at once.

    Returns:
        `torch.Tensor`: `(N, S)` float32 log-probabilities.
    """
    args = (logit_scale, final_logit_softcapping, 1.0 / temperature)
    chunks = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            chunks.append(
                checkpoint(_support_logprobs_chunk, hidden[rows], weight, bias, support_ids[rows], *args,
                           use_reentrant=False)
            )
        else:
            chunks.append(_support_logprobs_chunk(hidden[rows], weight, bias, support_ids[rows], *args))
    if not chunks:
        return hidden.new_zeros(support_ids.shape, dtype=torch.float32)
    return torch.cat(chunks)
