"""
Dense float64 references: the formulas the package computes in chunks, in float32 or with fused kernels, written out
plainly over full logits in float64. Tests compare against these with the tolerances of tests/numerics.py.

Every function is differentiable, so a test can backpropagate through a reference to check gradients too. Logits are
(..., V): the last dimension is the vocabulary; pass `logits[..., :V]` to score a head padded past its tokenizer.
"""

import math

import torch
import torch.nn.functional as F


def logits(hidden, weight, bias=None, scale=1.0, softcap=None, temperature=1.0):
    """The head's logits in float64: ((hidden · weightᵀ + bias) · scale, soft-capped as cap · tanh(z / cap)) / T."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def log_probs(logits):
    """log softmax over the vocabulary, in float64."""
    return F.log_softmax(logits.double(), dim=-1)


def entropy(logits):
    """Per-token entropy H(p) = −Σ p log p, in nats."""
    log_p = log_probs(logits)
    return -(log_p.exp() * log_p).sum(-1)


def normalized_entropy(logits):
    """Per-token entropy divided by its maximum ln V, in [0, 1]."""
    return entropy(logits) / math.log(logits.shape[-1])


def reverse_kl(student_logits, teacher_logits):
    """Per-token KL(student ‖ teacher) = Σ p_s (log p_s − log p_t)."""
    log_s, log_t = log_probs(student_logits), log_probs(teacher_logits)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def forward_kl(student_logits, teacher_logits):
    """Per-token KL(teacher ‖ student) = Σ p_t (log p_t − log p_s)."""
    log_s, log_t = log_probs(student_logits), log_probs(teacher_logits)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def generalized_jsd(student_logits, teacher_logits, beta):
    """
    TRL's generalised JSD: β = 0 is the forward KL, β = 1 the reverse KL, and otherwise
    β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m) with the mixture m = (1 − β) p_s + β p_t.
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    log_s, log_t = log_probs(student_logits), log_probs(teacher_logits)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)


def normalized_jsd(student_logits, teacher_logits):
    """The symmetric (β = 0.5) Jensen-Shannon divergence divided by its maximum ln 2, in [0, 1]."""
    return generalized_jsd(student_logits, teacher_logits, 0.5) / math.log(2.0)


# ---- Losses over a batch of rollouts: per-token values (batch, length) and a 0/1 mask of the tokens that count ----


def token_mean(per_token, mask):
    """TRL's normalisation: the mean over every counted token of the batch."""
    return per_token[mask.bool()].mean()


def rollout_means(per_token, mask):
    """Each rollout's mean over its own counted tokens."""
    mask = mask.double()
    return (per_token * mask).sum(-1) / mask.sum(-1)


def rollout_mean_loss(per_token, mask):
    """OPSDC's normalisation (PACED's too, in sample mode): the plain mean over rollouts of their token means."""
    return rollout_means(per_token, mask).mean()


def paced_loss(per_token, mask, weights, weight_sum):
    """PACED's loss: Σ_rollouts w · (rollout token mean) / weight_sum, weight_sum being that of the whole batch."""
    return (weights.double() * rollout_means(per_token, mask)).sum() / weight_sum


# ---- Full forward passes ----


@torch.no_grad()
def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """
    The logits `model` (in its own dtype) gives each completion token, from a plain forward pass over prompt and
    completion: those at the positions that predict the completion tokens, (batch, completion length, V).
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_ids.size(1)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
