"""Chunked per-token statistics of a student and a teacher, and a divergence whose backward runs on chosen tokens only.

Both are built from TRL's chunked divergence kernel (`trl.kernels.chunked_divergence`): the logits are projected from
hidden states and `lm_head` weights on `[4096 tokens x 32768 vocabulary]` tiles, so neither model's `(tokens x V)`
logits ever exist in full. One forward pass over the tiles yields, per token, the student's entropy, the reverse KL
and the forward KL (the kernel's online-logsumexp statistics hold all three); the loss then reuses those statistics, so
the only extra work token selection costs is nothing in the forward and a backward over the kept tokens alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from trl.kernels.chunked_divergence import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ._trl_compat import (
    KERNEL_BLOCK_SIZE,
    chunked_divergence_backward,
    compute_dtype,
    jsd_kernel,
    jsd_tile,
    project_tile,
    save_for_chunked_divergence_backward,
    stats_kernel,
    stats_tile,
    torch_transform,
    use_triton,
)


@dataclass
class TokenStats:
    """
    Per-token statistics of a student S and a teacher T over the vocabulary V, each of shape `(N,)`, float32.

    Attributes:
        entropy (`torch.Tensor`): normalised student entropy h = H(S) / ln|V|, in [0, 1].
        reverse_kl (`torch.Tensor`): δ = KL(S || T), the on-policy distillation loss.
        forward_kl (`torch.Tensor`): φ = KL(T || S).
        entropy_nats (`torch.Tensor`): H(S) in nats (what TRL logs as `entropy`).
        student_log_z (`torch.Tensor`): log-partition of the student's (scaled, capped, tempered) logits.
        teacher_log_z (`torch.Tensor`): log-partition of the teacher's.
    """

    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    entropy_nats: torch.Tensor
    student_log_z: torch.Tensor
    teacher_log_z: torch.Tensor


def _kernel_args(temperature, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap) -> dict:
    # The exact arguments TRL's `ChunkedDivergenceFunction.forward` hands its kernels.
    return {
        "s_scale": student_logit_scale,
        "s_softcap": student_softcap or 1.0,
        "t_scale": teacher_logit_scale,
        "t_softcap": teacher_softcap or 1.0,
        "inv_t": 1 / temperature,
        "S_HAS_SOFTCAP": student_softcap is not None,
        "T_HAS_SOFTCAP": teacher_softcap is not None,
    }


def _projected_tiles(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
    """
    Walk both models' logits tile by tile, as `ChunkedDivergenceFunction` does: for each `[≤ 4096 tokens × ≤ 32768
    vocabulary]` tile, yield the token slice and the student's and teacher's fp32 logits of that tile (buffers reused
    from tile to tile, so consume each before the next). Neither model's full logits ever exist.
    """
    n_tokens = student_hidden.shape[0]
    device = student_hidden.device
    s_dtype, t_dtype = compute_dtype(student_hidden), compute_dtype(teacher_hidden)
    rows = min(n_tokens, TOKEN_CHUNK_SIZE)
    s_buf = torch.empty((rows, VOCAB_CHUNK_SIZE), device=device, dtype=torch.float32)
    t_buf = torch.empty((rows, VOCAB_CHUNK_SIZE), device=device, dtype=torch.float32)
    with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
        vocab = student_weight.shape[0]
        for token_start in range(0, n_tokens, TOKEN_CHUNK_SIZE):
            token_end = min(token_start + TOKEN_CHUNK_SIZE, n_tokens)
            n = token_end - token_start
            h_s = student_hidden[token_start:token_end].to(s_dtype)
            h_t = teacher_hidden[token_start:token_end].to(t_dtype)
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                s_tile, t_tile = s_buf[:n, : end - start], t_buf[:n, : end - start]
                project_tile(s_tile, h_s, student_weight, student_bias, start, end, s_dtype)
                project_tile(t_tile, h_t, teacher_weight, teacher_bias, start, end, t_dtype)
                yield slice(token_start, token_end), s_tile, t_tile


@torch.no_grad()
def token_stats(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
) -> TokenStats:
    """
    Per-token normalised student entropy, reverse KL and forward KL, computed in chunks from hidden states and
    `lm_head` weights, without gradient.

    Logits are post-processed exactly as in TRL's distillation loss: `z = softcap·tanh(scale·x / softcap) / T` (bias
    added before, softcap only when set), so the statistics match the divergence TRL trains on.

    Args:
        student_hidden (`torch.Tensor`): `(..., H_s)` student hidden states before the `lm_head`.
        student_weight (`torch.Tensor`): `(V, H_s)` student `lm_head` weight.
        teacher_hidden (`torch.Tensor`): `(..., H_t)` teacher hidden states at the same positions.
        teacher_weight (`torch.Tensor`): `(V, H_t)` teacher `lm_head` weight.
        student_bias, teacher_bias (`torch.Tensor`, *optional*): `(V,)` `lm_head` biases.
        temperature (`float`, defaults to `1.0`): softmax temperature of both distributions.
        student_logit_scale, teacher_logit_scale (`float`, defaults to `1.0`): logit multipliers.
        student_final_logit_softcapping, teacher_final_logit_softcapping (`float`, *optional*): Gemma-style caps.

    Returns:
        [`TokenStats`]: tensors of shape `student_hidden.shape[:-1]`.
    """
    # Under ZeRO-3 the heads are partitioned to `numel 0` outside their module's forward: every read of their shapes
    # (the vocabulary check, ln|V|) happens inside the gather, as does the tile walk (whose own gather is then a no-op).
    with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(
                f"Student and teacher vocabularies differ ({student_weight.shape[0]} vs {teacher_weight.shape[0]}); "
                "token statistics compare full next-token distributions, which needs a shared vocabulary."
            )
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"Student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
                f"{tuple(teacher_hidden.shape)} must cover the same positions."
            )
        leading_shape = student_hidden.shape[:-1]
        student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        device = student_hidden.device
        n_tokens = student_hidden.shape[0]
        kernel_args = _kernel_args(
            temperature,
            student_logit_scale,
            student_final_logit_softcapping,
            teacher_logit_scale,
            teacher_final_logit_softcapping,
        )

        def zeros():
            return torch.zeros((n_tokens,), device=device, dtype=torch.float32)

        s_max, t_max = zeros() - math.inf, zeros() - math.inf
        s_sum, s_x_sum, t_sum, t_weighted_gap, s_weighted_gap = zeros(), zeros(), zeros(), zeros(), zeros()
        for sl, s_tile, t_tile in _projected_tiles(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
        ):
            n = sl.stop - sl.start
            fold = stats_kernel[(n,)] if use_triton(device) else stats_tile
            fold(
                s_tile,
                s_tile.stride(0),
                t_tile,
                t_tile.stride(0),
                s_max[sl],
                s_sum[sl],
                s_x_sum[sl],
                t_max[sl],
                t_sum[sl],
                t_weighted_gap[sl],
                s_weighted_gap[sl],
                s_tile.shape[1],
                BLOCK_SIZE=KERNEL_BLOCK_SIZE,
                **kernel_args,
            )
        # The same closed forms as `ChunkedDivergenceFunction.forward`, so β ∈ {0, 1} losses are bit-identical to
        # TRL's.
        s_log_z = s_max + torch.log(s_sum)
        t_log_z = t_max + torch.log(t_sum)
        entropy_nats = s_log_z - s_x_sum / s_sum
        reverse_kl = s_weighted_gap / s_sum - s_log_z + t_log_z
        forward_kl = t_weighted_gap / t_sum - t_log_z + s_log_z
        return TokenStats(
            entropy=(entropy_nats / math.log(student_weight.shape[0])).reshape(leading_shape),
            reverse_kl=reverse_kl.reshape(leading_shape),
            forward_kl=forward_kl.reshape(leading_shape),
            entropy_nats=entropy_nats.reshape(leading_shape),
            student_log_z=s_log_z.reshape(leading_shape),
            teacher_log_z=t_log_z.reshape(leading_shape),
        )


@torch.no_grad()
def _generalized_jsd(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, s_log_z, t_log_z, beta,
    kernel_args,
) -> tuple[torch.Tensor, torch.Tensor]:
    # TRL's second pass for 0 < β < 1: the mixture needs both normalisers. Returns (JSD, KL(S || mixture)) per token.
    device = student_hidden.device
    n_tokens = student_hidden.shape[0]
    jsd = torch.zeros((n_tokens,), device=device, dtype=torch.float32)
    kl_student = torch.zeros_like(jsd)
    for sl, s_tile, t_tile in _projected_tiles(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
    ):
        n = sl.stop - sl.start
        fold = jsd_kernel[(n,)] if use_triton(device) else jsd_tile
        fold(
            s_tile,
            s_tile.stride(0),
            t_tile,
            t_tile.stride(0),
            s_log_z[sl],
            t_log_z[sl],
            jsd[sl],
            kl_student[sl],
            s_tile.shape[1],
            beta,
            BLOCK_SIZE=KERNEL_BLOCK_SIZE,
            **kernel_args,
        )
    return jsd, kl_student


class _PrecomputedDivergenceFunction(torch.autograd.Function):
    """
    The per-token divergence of [`~trl.kernels.chunked_divergence.ChunkedDivergenceFunction`] for rows whose forward
    statistics are already known: the forward returns them as they are, and the backward is TRL's own, run over these
    rows only. This is what lets tokens that were scored but not kept skip the `lm_head` backward entirely.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        divergence,
        student_log_z,
        teacher_log_z,
        aux,
        beta,
        kernel_args,
    ):
        ctx.set_materialize_grads(False)
        # The context `ChunkedDivergenceFunction.backward` reads, filled as its forward fills it.
        save_for_chunked_divergence_backward(
            ctx,
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            student_log_z,
            teacher_log_z,
            aux,
            beta,
            kernel_args,
        )
        return divergence.clone()

    @staticmethod
    def backward(ctx, grad_divergence):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = chunked_divergence_backward(ctx, grad_divergence)
        return grad_hidden, grad_weight, grad_bias, *(None,) * 9


def divergence_from_stats(
    stats_rows: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    stats: TokenStats,
    beta: float,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """
    Differentiable per-token generalised JSD (TRL's: β=0 forward KL, β=1 reverse KL) for a subset of rows that
    [`token_stats`] has already scored.

    Args:
        stats_rows (`torch.Tensor`): `(M,)` long indices into the flattened rows of `stats`.
        student_hidden (`torch.Tensor`): `(M, H_s)` student hidden states of those rows, with gradient.
        teacher_hidden (`torch.Tensor`): `(M, H_t)` teacher hidden states of those rows.
        stats ([`TokenStats`]): statistics of all rows, flattened or not.

    Returns:
        `torch.Tensor`: `(M,)` divergence; its gradient flows to `student_hidden`, `student_weight` and `student_bias`
        through TRL's chunked backward over these M rows only.
    """
    kernel_args = _kernel_args(
        temperature,
        student_logit_scale,
        student_final_logit_softcapping,
        teacher_logit_scale,
        teacher_final_logit_softcapping,
    )
    s_log_z = stats.student_log_z.reshape(-1)[stats_rows]
    t_log_z = stats.teacher_log_z.reshape(-1)[stats_rows]
    if beta == 0.0:
        divergence = aux = stats.forward_kl.reshape(-1)[stats_rows]
    elif beta == 1.0:
        divergence = aux = stats.reverse_kl.reshape(-1)[stats_rows]
    else:
        divergence, aux = _generalized_jsd(
            student_hidden.detach(),
            # Not detached (the pass runs under no_grad): a detached view of a ZeRO-3 parameter loses the handle its
            # gather needs and stays empty.
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            s_log_z,
            t_log_z,
            beta,
            kernel_args,
        )
    return _PrecomputedDivergenceFunction.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        divergence,
        s_log_z,
        t_log_z,
        aux,
        beta,
        kernel_args,
    )


def _student_stats_tile(s_tile, s_max, s_sum, s_x_sum, s_scale, s_softcap, inv_t, S_HAS_SOFTCAP):
    # The student half of TRL's `_stats_tile`, the same operations in the same order (so the same bits).
    zs = torch_transform(s_tile, s_scale, s_softcap, inv_t, S_HAS_SOFTCAP)
    new_s_m = torch.maximum(s_max, zs.amax(-1))
    s_rescale = torch.exp(s_max - new_s_m)
    es = torch.exp(zs - new_s_m.unsqueeze(-1))
    s_sum.mul_(s_rescale).add_(es.sum(-1))
    s_x_sum.mul_(s_rescale).add_((es * zs).sum(-1))
    s_max.copy_(new_s_m)


@torch.no_grad()
def student_entropy(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The student's per-token entropy alone, in chunks, without gradient and without touching a teacher: what the
    selection rules that need no divergence (`random`, `entropy_sample`, `entropy_topk`) read before the teacher's
    `lm_head` is projected on the kept tokens only.

    The values are those of [`token_stats`] (same tiles, same operations on the student's logits).

    Args:
        student_hidden (`torch.Tensor`): `(..., H_s)` student hidden states before the `lm_head`.
        student_weight (`torch.Tensor`): `(V, H_s)` student `lm_head` weight.
        student_bias (`torch.Tensor`, *optional*), temperature, student_logit_scale, student_final_logit_softcapping:
            as in [`token_stats`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the normalised entropy H(S) / ln|V| and H(S) in nats, float32, of shape
        `student_hidden.shape[:-1]`.
    """
    with maybe_gather_lm_head_ctx(student_weight, student_bias):
        leading_shape = student_hidden.shape[:-1]
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        device, n_tokens, vocab = hidden.device, hidden.shape[0], student_weight.shape[0]
        kernel_args = _kernel_args(temperature, student_logit_scale, student_final_logit_softcapping, 1.0, None)
        dtype = compute_dtype(hidden)
        s_max = torch.full((n_tokens,), -math.inf, device=device, dtype=torch.float32)
        s_sum, s_x_sum = torch.zeros_like(s_max), torch.zeros_like(s_max)
        rows = min(n_tokens, TOKEN_CHUNK_SIZE)
        s_buf = torch.empty((rows, VOCAB_CHUNK_SIZE), device=device, dtype=torch.float32)
        triton = use_triton(device)
        if triton:
            # TRL's fused kernel folds a teacher too: hand it the student's tile in that role and discard its outputs.
            t_max, t_sum = torch.zeros_like(s_max) - math.inf, torch.zeros_like(s_max)
            t_gap, s_gap = torch.zeros_like(s_max), torch.zeros_like(s_max)
            kernel_args.update(t_scale=kernel_args["s_scale"], t_softcap=kernel_args["s_softcap"],
                               T_HAS_SOFTCAP=kernel_args["S_HAS_SOFTCAP"])
        for token_start in range(0, n_tokens, TOKEN_CHUNK_SIZE):
            sl = slice(token_start, min(token_start + TOKEN_CHUNK_SIZE, n_tokens))
            n = sl.stop - sl.start
            h_s = hidden[sl].to(dtype)
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                s_tile = s_buf[:n, : end - start]
                project_tile(s_tile, h_s, student_weight, student_bias, start, end, dtype)
                if triton:
                    stats_kernel[(n,)](
                        s_tile, s_tile.stride(0), s_tile, s_tile.stride(0), s_max[sl], s_sum[sl], s_x_sum[sl],
                        t_max[sl], t_sum[sl], t_gap[sl], s_gap[sl], s_tile.shape[1], BLOCK_SIZE=KERNEL_BLOCK_SIZE,
                        **kernel_args,
                    )
                else:
                    _student_stats_tile(
                        s_tile, s_max[sl], s_sum[sl], s_x_sum[sl], kernel_args["s_scale"], kernel_args["s_softcap"],
                        kernel_args["inv_t"], kernel_args["S_HAS_SOFTCAP"],
                    )
        # The closed form of `token_stats`.
        entropy_nats = (s_max + torch.log(s_sum)) - s_x_sum / s_sum
        return (entropy_nats / math.log(vocab)).reshape(leading_shape), entropy_nats.reshape(leading_shape)


def shared_vocab_head(
    weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The first `vocab_size` rows of an `lm_head` weight and bias, as views (no copy; gradients reach the full weight,
    with zeros on the rows left out). `vocab_size=None` returns them unchanged. Used when two heads padded to
    different sizes share a tokenizer: both are compared over the rows the tokenizer can produce.
    """
    if vocab_size is None or vocab_size == weight.shape[0]:
        return weight, bias
    return weight[:vocab_size], None if bias is None else bias[:vocab_size]


@torch.no_grad()
def normalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    stats: TokenStats,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """
    Per-token Jensen-Shannon divergence of student and teacher divided by ln 2, in [0, 1], without gradient.

    `JSD = ½ KL(S || M) + ½ KL(T || M)` with `M = ½ (S + T)`, TRL's generalised JSD at β = ½, computed by the same
    chunked second pass that TRL runs for 0 < β < 1, from the normalisers that [`token_stats`] already holds (one more
    walk over the tiles, no `(tokens × V)` tensor). It is a bounded divergence for ranking tokens, as the TIP authors'
    scoring code uses it; it is not what any loss here trains on.

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight, biases, and logit options:
            as for [`token_stats`], for the rows that `stats` scored, in the same order.
        stats ([`TokenStats`]): the statistics of those rows.

    Returns:
        `torch.Tensor`: `(N,)` float32 values in [0, 1], one per row.
    """
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    kernel_args = _kernel_args(
        temperature,
        student_logit_scale,
        student_final_logit_softcapping,
        teacher_logit_scale,
        teacher_final_logit_softcapping,
    )
    jsd, _ = _generalized_jsd(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        stats.student_log_z.reshape(-1),
        stats.teacher_log_z.reshape(-1),
        0.5,
        kernel_args,
    )
    # Rounding can put a value a hair outside [0, ln 2]; the axis is meant to be bounded.
    return (jsd / math.log(2.0)).clamp(0.0, 1.0)
