"""
The divergence on a served teacher's sparse support (top-k log-probs plus a tail bucket) and TIP's selection on it,
against values computed by hand and dense float64 references.
"""

import math

import pytest
import torch

from trl_tip.losses import selective_divergence_loss
from trl_tip.served_loss import ServedTeacherLogprobs, selective_sparse_divergence_loss
from trl_tip.sparse_divergence import (
    sparse_distribution,
    sparse_divergence,
    sparse_support,
    student_support_logprobs,
)


def test_support_rules():
    topk_ids = torch.tensor([[4, 7], [2, 5]])
    topk_logprobs = torch.log(torch.tensor([[0.5, 0.2], [0.6, 0.1]]))
    sampled = torch.tensor([7, 3])
    sampled_logprobs = torch.log(torch.tensor([0.2, 0.05]))
    # beta = 0: the teacher's top-k.
    ids, values, mask = sparse_support(topk_ids, topk_logprobs, sampled, sampled_logprobs, 0.0)
    assert ids.tolist() == [[4, 7], [2, 5]] and mask.all()
    # beta = 1, k = 1 (TRL's reverse-KL support): the sampled token alone.
    ids, values, mask = sparse_support(topk_ids[:, :1], topk_logprobs[:, :1], sampled, sampled_logprobs, 1.0)
    assert ids.tolist() == [[7], [3]] and torch.equal(values, sampled_logprobs[:, None]) and mask.all()
    # 0 < beta < 1, k = 1 (TRL's mixed support): the teacher's top-1 and the sampled token when it is another.
    ids, values, mask = sparse_support(topk_ids[:, :1], topk_logprobs[:, :1], torch.tensor([4, 3]),
                                       sampled_logprobs, 0.5)
    assert ids[:, 0].tolist() == [4, 2] and mask.tolist() == [[True, False], [True, True]]
    # beta > 0, k > 1: the top-k and the sampled token, counted once.
    ids, values, mask = sparse_support(topk_ids, topk_logprobs, sampled, sampled_logprobs, 1.0)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert ids[1].tolist() == [2, 5, 3]
    # A top-k entry the server did not fill (-inf) is masked out.
    missing = topk_logprobs.clone()
    missing[0, 1] = -math.inf
    assert sparse_support(topk_ids, missing, sampled, sampled_logprobs, 0.0)[2].tolist() == [[True, False],
                                                                                            [True, True]]


def test_divergence_by_hand():
    # One support token: student 0.5, teacher 0.8; tails 0.5 and 0.2.
    student = torch.log(torch.tensor([[0.5]], dtype=torch.float64))
    teacher = torch.log(torch.tensor([[0.8]], dtype=torch.float64))
    mask = torch.ones(1, 1, dtype=torch.bool)
    # reverse: 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.5 ln(1.5625) = ln 1.25
    assert sparse_divergence(student, teacher, mask, 1.0).item() == pytest.approx(0.22314355131, abs=1e-10)
    # forward: 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.8 · 0.4700036292 − 0.2 · 0.9162907319
    assert sparse_divergence(student, teacher, mask, 0.0).item() == pytest.approx(0.19274475, abs=1e-8)
    # Without the tail the single token is renormalised to 1 on both sides: no divergence.
    assert sparse_divergence(student, teacher, mask, 1.0, add_tail=False).item() == pytest.approx(0.0, abs=1e-12)
    # Two tokens, renormalised: student (0.3, 0.1) -> (0.75, 0.25), teacher (0.2, 0.2) -> (0.5, 0.5);
    # reverse = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.3040988 − 0.1732868
    two_s = torch.log(torch.tensor([[0.3, 0.1]], dtype=torch.float64))
    two_t = torch.log(torch.tensor([[0.2, 0.2]], dtype=torch.float64))
    both = torch.ones(1, 2, dtype=torch.bool)
    assert sparse_divergence(two_s, two_t, both, 1.0, add_tail=False).item() == pytest.approx(0.1308120, abs=1e-7)


def test_tail_bucket_by_hand():
    logprobs, mask = sparse_distribution(torch.log(torch.tensor([[0.5, 0.2]])), torch.tensor([[True, False]]))
    # The masked entry counts for nothing: the tail holds 1 − 0.5.
    assert mask.tolist() == [[True, False, True]]
    assert logprobs[0, 2].exp().item() == pytest.approx(0.5, abs=1e-6)


def _dense(logits_s, logits_t, beta):
    s, t = logits_s.double().log_softmax(-1), logits_t.double().log_softmax(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_support_is_the_full_divergence_and_smaller_supports_bound_it(beta):
    torch.manual_seed(0)
    vocab, n = 11, 6
    logits_s, logits_t = torch.randn(n, vocab, dtype=torch.float64) * 2, torch.randn(n, vocab, dtype=torch.float64) * 2
    s, t = logits_s.log_softmax(-1), logits_t.log_softmax(-1)
    sampled = torch.randint(vocab, (n,))
    full = _dense(logits_s, logits_t, beta)
    for k in (1, 3, vocab):
        top_values, top_ids = t.topk(k, dim=-1)
        ids, teacher, mask = sparse_support(top_ids, top_values, sampled, t.gather(-1, sampled[:, None])[:, 0], beta)
        divergence = sparse_divergence(s.gather(-1, ids), teacher, mask, beta)
        if k == vocab:
            # The tail then holds no mass (clamped to 1e-7 on both sides): the divergence is the full one.
            torch.testing.assert_close(divergence, full, atol=1e-6, rtol=0)
        elif beta in (0.0, 1.0):
            # Merging outcomes never increases a KL divergence.
            assert (divergence <= full + 1e-12).all()


def test_student_support_logprobs_chunks_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(13, 5, requires_grad=True)
    bias = torch.randn(13)
    ids = torch.randint(13, (7, 3))
    reference = (torch.nn.functional.linear(hidden, weight, bias) * 2.0 / 0.7).log_softmax(-1).gather(-1, ids)
    chunked = student_support_logprobs(hidden, weight, ids, bias, temperature=0.7, logit_scale=2.0, chunk_rows=3)
    torch.testing.assert_close(chunked, reference)
    upstream = torch.randn(7, 3)
    expected = torch.autograd.grad((reference * upstream).sum(), (hidden, weight))
    got = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def _served_batch(vocab=17, hidden_size=6, batch=3, length=8, k=None, seed=0):
    """A student's hidden states and head, a teacher's logits and what a server returns for them (top-k)."""
    torch.manual_seed(seed)
    student_hidden = torch.randn(batch, length, hidden_size)
    teacher_hidden = torch.randn(batch, length, hidden_size)
    student_weight, teacher_weight = torch.randn(vocab, hidden_size), torch.randn(vocab, hidden_size)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    completion_ids = torch.randint(vocab, (batch, length))
    teacher_logprobs = (teacher_hidden @ teacher_weight.T).log_softmax(-1)
    top_values, top_ids = teacher_logprobs.topk(k or vocab, dim=-1)
    served = ServedTeacherLogprobs(top_ids, top_values, teacher_logprobs.gather(-1, completion_ids[..., None])[..., 0])
    return student_hidden, teacher_hidden, student_weight, teacher_weight, mask, completion_ids, served


@pytest.mark.parametrize("method", ["all", "soft_or", "random", "entropy_topk", "entropy_sample", "overconfident"])
def test_full_support_selects_and_trains_as_the_local_teacher(method):
    student_hidden, teacher_hidden, student_weight, teacher_weight, mask, ids, served = _served_batch()
    student_hidden.requires_grad_(True)
    local = selective_divergence_loss(student_hidden, teacher_hidden, student_weight, teacher_weight, mask, 1.0,
                                      method=method, ratio=0.5, generator=torch.Generator().manual_seed(0))
    sparse = selective_sparse_divergence_loss(student_hidden, student_weight, ids, mask, served, 1.0, method=method,
                                              ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sparse.keep, local.keep)
    torch.testing.assert_close(sparse.entropy[mask.bool()], local.entropy[mask.bool()])
    torch.testing.assert_close(sparse.loss, local.loss, atol=1e-5, rtol=1e-5)
    grad_sparse, = torch.autograd.grad(sparse.loss, student_hidden)
    grad_local, = torch.autograd.grad(local.loss, student_hidden)
    torch.testing.assert_close(grad_sparse, grad_local, atol=1e-5, rtol=1e-4)


def test_student_side_rules_keep_the_local_selection_at_any_k():
    for method in ("random", "entropy_topk", "entropy_sample"):
        student_hidden, teacher_hidden, student_weight, teacher_weight, mask, ids, served = _served_batch(k=1)
        local = selective_divergence_loss(student_hidden, teacher_hidden, student_weight, teacher_weight, mask, 1.0,
                                          method=method, ratio=0.3, generator=torch.Generator().manual_seed(1))
        sparse = selective_sparse_divergence_loss(student_hidden, student_weight, ids, mask, served, 1.0,
                                                  method=method, ratio=0.3, generator=torch.Generator().manual_seed(1))
        assert torch.equal(sparse.keep, local.keep), method


def test_all_is_the_mean_sparse_divergence_over_completion_tokens():
    student_hidden, _, student_weight, _, mask, ids, served = _served_batch(k=1)
    out = selective_sparse_divergence_loss(student_hidden, student_weight, ids, mask, served, 1.0, method="all")
    # Dense reference: for beta = 1, k = 1 the support is the sampled token and the tail, a Bernoulli KL.
    s = (student_hidden.double() @ student_weight.double().T).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    t = served.sampled_logprobs.double()
    per_token = s.exp() * (s - t) + (-s.exp()).log1p().exp() * ((-s.exp()).log1p() - (-t.exp()).log1p())
    expected = per_token[mask.bool()].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.keep.equal(mask.bool())


def test_rollout_weights_give_the_weighted_mean_over_rollouts():
    student_hidden, _, student_weight, _, mask, ids, served = _served_batch(k=4)
    weights = torch.tensor([1.0, 0.0, 3.0])
    out = selective_sparse_divergence_loss(student_hidden, student_weight, ids, mask, served, 0.0, method="all",
                                           rollout_weights=weights)
    per_token = selective_sparse_divergence_loss(student_hidden, student_weight, ids, mask, served, 0.0,
                                                 method="all", num_items_in_batch=1)
    # ℓ_i per rollout from single-rollout losses (means over its tokens).
    losses = [
        selective_sparse_divergence_loss(student_hidden[i : i + 1], student_weight, ids[i : i + 1], mask[i : i + 1],
                                         ServedTeacherLogprobs(served.topk_ids[i : i + 1],
                                                               served.topk_logprobs[i : i + 1],
                                                               served.sampled_logprobs[i : i + 1]),
                                         0.0, method="all").loss
        for i in range(3)
    ]
    assert per_token.loss.item() > 0
    assert out.loss.item() == pytest.approx((1.0 * losses[0] + 3.0 * losses[2]).item() / 4.0, rel=1e-5)
