import pytest
import torch
from trl.kernels import chunked_divergence
from trl_tip._trl_compat import trl_chunked_divergence_loss

import importlib
from trl_tip import selective_divergence_loss, token_stats
from trl_tip.selection import select_tokens
from trl_tip.chunked_stats import divergence_from_stats
import reference
from numerics import assert_close_to_float64


chunked_stats_module = importlib.import_module("trl_tip.chunked_stats")


@pytest.fixture
def small_chunks(monkeypatch):
    # Force several token and vocabulary chunks on small tensors, so the chunked loops are really exercised.
    for module in (chunked_stats_module, chunked_divergence):
        monkeypatch.setattr(module, "TOKEN_CHUNK_SIZE", 5)
        monkeypatch.setattr(module, "VOCAB_CHUNK_SIZE", 7)


@pytest.mark.parametrize(
    "logit_kwargs",
    [
        {},
        {"temperature": 0.7},
        {"student_logit_scale": 0.5, "teacher_logit_scale": 2.0},
        {"student_final_logit_softcapping": 3.0, "teacher_final_logit_softcapping": 5.0},
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_stats_match_full_logits(small_chunks, logit_kwargs, with_bias):
    torch.manual_seed(0)
    vocab, n = 23, 13
    h_s, h_t = torch.randn(n, 8), torch.randn(n, 12)
    w_s, w_t = torch.randn(vocab, 8), torch.randn(vocab, 12)
    b_s, b_t = (torch.randn(vocab), torch.randn(vocab)) if with_bias else (None, None)
    stats = token_stats(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, **logit_kwargs)
    temperature = logit_kwargs.get("temperature", 1.0)
    s_logits = reference.logits(h_s, w_s, b_s, logit_kwargs.get("student_logit_scale", 1.0),
                                logit_kwargs.get("student_final_logit_softcapping"), temperature)
    t_logits = reference.logits(h_t, w_t, b_t, logit_kwargs.get("teacher_logit_scale", 1.0),
                                logit_kwargs.get("teacher_final_logit_softcapping"), temperature)
    entropy = reference.normalized_entropy(s_logits)
    reverse, forward = reference.reverse_kl(s_logits, t_logits), reference.forward_kl(s_logits, t_logits)
    # Every statistic is a log-partition difference of these logits: its float32 error scales with their magnitude.
    logit_scale = max(s_logits.abs().max().item(), t_logits.abs().max().item())
    assert_close_to_float64(stats.entropy, entropy, scale=logit_scale)
    assert_close_to_float64(stats.reverse_kl, reverse, scale=logit_scale)
    assert_close_to_float64(stats.forward_kl, forward, scale=logit_scale)
    assert ((stats.entropy >= 0) & (stats.entropy <= 1 + 1e-6)).all()


def test_token_stats_keeps_leading_shape_and_needs_no_grad():
    h_s = torch.randn(2, 3, 4, requires_grad=True)
    stats = token_stats(h_s, torch.randn(11, 4), torch.randn(2, 3, 5), torch.randn(11, 5))
    assert stats.entropy.shape == stats.reverse_kl.shape == stats.forward_kl.shape == (2, 3)
    assert not stats.entropy.requires_grad


def test_token_stats_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="shared vocabulary"):
        token_stats(torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 4), torch.randn(11, 4))
    with pytest.raises(ValueError, match="same positions"):
        token_stats(torch.randn(3, 4), torch.randn(10, 4), torch.randn(2, 4), torch.randn(10, 4))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_from_stats_value_and_gradient_on_chosen_rows(small_chunks, beta):
    torch.manual_seed(1)
    vocab, n = 19, 11
    h_s, w_s, b_s = torch.randn(n, 6), torch.randn(vocab, 6), torch.randn(vocab)
    h_t, w_t = torch.randn(n, 6), torch.randn(vocab, 6)
    stats = token_stats(h_s, w_s, h_t, w_t, student_bias=b_s, temperature=0.9)
    rows = torch.tensor([1, 4, 5, 9])

    leaf_h, leaf_w, leaf_b = (t.clone().requires_grad_(True) for t in (h_s, w_s, b_s))
    ours = divergence_from_stats(rows, leaf_h[rows], leaf_w, h_t[rows], w_t, stats, beta, student_bias=leaf_b,
                                 temperature=0.9)
    ours.sum().backward()

    ref_h, ref_w, ref_b = (t.clone().double().requires_grad_(True) for t in (h_s, w_s, b_s))
    s_logits = reference.logits(ref_h, ref_w, ref_b, temperature=0.9)
    t_logits = reference.logits(h_t, w_t, temperature=0.9)
    expected = reference.generalized_jsd(s_logits, t_logits, beta)[rows]
    expected.sum().backward()

    logit_scale = max(s_logits.abs().max().item(), t_logits.abs().max().item())
    assert_close_to_float64(ours, expected, scale=logit_scale)
    # A gradient is a sum of (probability differences) × (hidden states or weights); the probabilities carry the
    # logits' relative rounding, so its error scales with the logit magnitude times the gradient's own.
    for ours_grad, reference_grad in ((leaf_h.grad, ref_h.grad), (leaf_w.grad, ref_w.grad), (leaf_b.grad, ref_b.grad)):
        assert_close_to_float64(ours_grad, reference_grad, scale=logit_scale * reference_grad.abs().max().item())
    # Rows that were not chosen get no gradient at all.
    unchosen = torch.ones(n, dtype=torch.bool)
    unchosen[rows] = False
    assert torch.count_nonzero(leaf_h.grad[unchosen]) == 0


def _batch(seed=0, batch=3, width=6, hidden_s=8, hidden_t=10, vocab=29):
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(batch, width, hidden_s, generator=generator)
    h_t = torch.randn(batch, width, hidden_t, generator=generator)
    w_s = torch.randn(vocab, hidden_s, generator=generator)
    w_t = torch.randn(vocab, hidden_t, generator=generator)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([6, 4, 1]).unsqueeze(1)).long()
    return h_s, h_t, w_s, w_t, mask


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 17])
def test_all_is_bit_identical_to_trl(small_chunks, beta, num_items):
    h_s, h_t, w_s, w_t, mask = _batch()
    a_h, a_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss_trl, entropy_trl, n_trl = trl_chunked_divergence_loss(
        a_h, h_t, a_w, w_t, mask, beta, num_items_in_batch=num_items
    )
    loss_trl.backward()
    b_h, b_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    ours = selective_divergence_loss(b_h, h_t, b_w, w_t, mask, beta, num_items_in_batch=num_items, method="all")
    ours.loss.backward()
    assert torch.equal(ours.loss, loss_trl)
    assert torch.equal(ours.entropy_sum, entropy_trl)
    assert ours.num_valid == n_trl
    assert torch.equal(b_h.grad, a_h.grad)
    assert torch.equal(b_w.grad, a_w.grad)


@pytest.mark.parametrize("method", ["soft_or", "entropy_topk", "divergence_topk", "overconfident", "random"])
def test_selected_loss_is_mean_over_kept_and_gradient_flows_only_through_kept(method):
    h_s, h_t, w_s, w_t, mask = _batch(seed=3)
    leaf = h_s.clone().requires_grad_(True)
    out = selective_divergence_loss(leaf, h_t, w_s, w_t, mask, 1.0, method=method, ratio=0.5,
                                    generator=torch.Generator().manual_seed(0))
    assert out.keep.sum(-1).tolist() == [3, 2, 1]
    stats = token_stats(h_s, w_s, h_t, w_t)
    torch.testing.assert_close(out.loss, stats.reverse_kl[out.keep].mean())
    out.loss.backward()
    grad_norm = leaf.grad.norm(dim=-1)
    assert (grad_norm[out.keep] > 0).all()
    assert torch.count_nonzero(grad_norm[~out.keep]) == 0
    # The rule saw the same statistics the loss trains on.
    expected_keep = select_tokens(stats.entropy, stats.reverse_kl, mask, method, 0.5, forward_kl=stats.forward_kl,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.keep, expected_keep)


def test_unkept_tokens_skip_the_lm_head_backward(monkeypatch):
    # TRL's chunked backward must run over the kept rows only: spy on the rows it receives.
    seen_rows = []
    original = chunked_divergence.ChunkedDivergenceFunction.backward

    def spy(ctx, grad_divergence, grad_entropy):
        seen_rows.append(ctx.saved_tensors[0].shape[0])
        return original(ctx, grad_divergence, grad_entropy)

    monkeypatch.setattr(chunked_divergence.ChunkedDivergenceFunction, "backward", staticmethod(spy))
    h_s, h_t, w_s, w_t, mask = _batch(seed=4)
    leaf = h_s.clone().requires_grad_(True)
    out = selective_divergence_loss(leaf, h_t, w_s, w_t, mask, 1.0, method="soft_or", ratio=0.5)
    out.loss.backward()
    assert seen_rows == [int(out.keep.sum())] == [6]


def test_num_items_in_batch_normalisation():
    h_s, h_t, w_s, w_t, mask = _batch(seed=5)
    mean = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method="soft_or", ratio=0.5)
    total = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, num_items_in_batch=torch.tensor(12.0),
                                      method="soft_or", ratio=0.5)
    torch.testing.assert_close(total.loss * 12, mean.loss * int(mean.keep.sum()))


def test_empty_completion_batch_is_a_finite_zero():
    h_s, h_t, w_s, w_t, mask = _batch(seed=6)
    out = selective_divergence_loss(h_s.requires_grad_(True), h_t, w_s, w_t, torch.zeros_like(mask), 1.0)
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)


# ---- Rules that select from the student alone: the teacher is projected on kept tokens only ----


@pytest.mark.parametrize("with_bias", [False, True])
def test_student_entropy_is_the_entropy_of_token_stats(small_chunks, with_bias):
    from trl_tip.chunked_stats import student_entropy

    h_s, h_t, w_s, w_t, _ = _batch(seed=11)
    bias = torch.randn(w_s.shape[0], generator=torch.Generator().manual_seed(1)) if with_bias else None
    kwargs = {"temperature": 0.7, "student_logit_scale": 0.5, "student_final_logit_softcapping": 3.0}
    stats = token_stats(h_s, w_s, h_t, w_t, student_bias=bias, **kwargs)
    entropy, entropy_nats = student_entropy(h_s, w_s, bias, **kwargs)
    # The same tiles and operations on the student's logits: the same bits.
    assert torch.equal(entropy, stats.entropy) and torch.equal(entropy_nats, stats.entropy_nats)


def _record_projected_rows(monkeypatch, weight_to_watch) -> list[int]:
    # The rows of every projection onto `weight_to_watch`, counted once per token chunk (at its first vocabulary tile).
    rows = []
    project = chunked_stats_module.project_tile

    def recording_project(tile, hidden_chunk, weight, bias, start, end, dtype):
        if weight is weight_to_watch and start == 0:
            rows.append(hidden_chunk.shape[0])
        return project(tile, hidden_chunk, weight, bias, start, end, dtype)

    monkeypatch.setattr(chunked_stats_module, "project_tile", recording_project)
    return rows


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", ["random", "entropy_sample", "entropy_topk"])
def test_student_side_rules_match_the_full_pass_and_project_the_teacher_on_kept_tokens(
    small_chunks, monkeypatch, method, beta, compact, weighted
):
    losses_module = importlib.import_module("trl_tip.losses")
    # `compact`: completion rows only, as where Triton runs (the bookkeeping differs; the tiles still run on CPU).
    monkeypatch.setattr(losses_module, "use_triton", lambda device: compact)
    h_s, h_t, w_s, w_t, _ = _batch(seed=12, batch=4, width=7)
    # Rollouts of 7, 5 and 2 tokens, and an empty one.
    mask = (torch.arange(7).unsqueeze(0) < torch.tensor([7, 5, 2, 0]).unsqueeze(1)).long()
    weights = torch.tensor([0.5, 0.0, 0.25, 1.0]) if weighted else None
    teacher_rows = _record_projected_rows(monkeypatch, w_t)

    def run():
        leaf_h, leaf_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        out = selective_divergence_loss(leaf_h, h_t, leaf_w, w_t, mask, beta, method=method, ratio=0.5,
                                        generator=torch.Generator().manual_seed(0), rollout_weights=weights,
                                        weight_sum=None if weights is None else 2.0)
        out.loss.backward()
        return out, leaf_h.grad, leaf_w.grad

    fast, fast_h, fast_w = run()
    fast_rows, teacher_rows[:] = list(teacher_rows), []
    monkeypatch.setattr(losses_module, "STUDENT_SIDE_METHODS", ())  # the joint pass: both heads on every token
    full, full_h, full_w = run()

    assert torch.equal(fast.keep, full.keep)
    kept = int(fast.keep.sum())
    # Statistics once on the kept tokens (and the generalised JSD's second pass over the loss rows, also kept).
    assert kept < int(mask.sum())
    if beta == 0.5:
        assert kept <= sum(fast_rows) <= 2 * kept
    else:
        assert sum(fast_rows) == kept
    assert sum(teacher_rows) > sum(fast_rows)
    scale = full.loss.abs().item()
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-6 * max(scale, 1e-3))
    for fast_grad, full_grad in ((fast_h, full_h), (fast_w, full_w)):
        torch.testing.assert_close(fast_grad, full_grad, rtol=1e-4, atol=1e-6 * full_grad.abs().max().item())
    torch.testing.assert_close(fast.entropy_sum, full.entropy_sum)
    torch.testing.assert_close(fast.reverse_kl[fast.keep], full.reverse_kl[full.keep], rtol=1e-5, atol=1e-6)
    assert torch.isnan(fast.reverse_kl[~fast.keep]).all()


def test_student_side_rules_at_ratio_one_use_the_joint_pass(monkeypatch):
    # Every token is kept at ρ = 1: the teacher is projected on every row once, with the divergence of every token.
    h_s, h_t, w_s, w_t, mask = _batch(seed=13)
    teacher_rows = _record_projected_rows(monkeypatch, w_t)
    out = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method="entropy_topk", ratio=1.0)
    assert sum(teacher_rows) == mask.numel() and not torch.isnan(out.reverse_kl).any()


@pytest.mark.parametrize("logit_kwargs", [{}, {"temperature": 0.7, "student_final_logit_softcapping": 3.0}])
def test_normalized_jsd_matches_full_logits(small_chunks, logit_kwargs):
    from trl_tip.chunked_stats import normalized_jsd

    torch.manual_seed(2)
    vocab, n = 23, 13
    h_s, h_t = torch.randn(n, 8), 3 * torch.randn(n, 12)  # a sharp teacher, so some JSDs come near ln 2
    w_s, w_t = torch.randn(vocab, 8), torch.randn(vocab, 12)
    stats = token_stats(h_s, w_s, h_t, w_t, **logit_kwargs)
    ours = normalized_jsd(h_s, w_s, h_t, w_t, stats, **logit_kwargs)
    temperature = logit_kwargs.get("temperature", 1.0)
    s_logits = reference.logits(h_s, w_s, None, 1.0, logit_kwargs.get("student_final_logit_softcapping"), temperature)
    t_logits = reference.logits(h_t, w_t, None, 1.0, None, temperature)
    # Values in [0, 1]: float32 rounding of terms of size <= 1 is ~1e-6 each, summed over 23 entries.
    torch.testing.assert_close(ours.double(), reference.normalized_jsd(s_logits, t_logits), rtol=0, atol=1e-5)
    assert ((ours >= 0) & (ours <= 1)).all() and ours.max() > 0.5


def test_jsd_selection_ranks_by_jsd_and_trains_the_beta_divergence():
    from trl_tip.chunked_stats import normalized_jsd

    h_s, h_t, w_s, w_t, mask = _batch(seed=7)
    stats = token_stats(h_s, w_s, h_t, w_t)
    jsd = normalized_jsd(h_s.reshape(-1, h_s.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t,
                         token_stats(h_s.reshape(-1, h_s.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t)
                         ).reshape(mask.shape)
    for method in ("soft_or", "divergence_topk"):
        out = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method=method, ratio=0.5,
                                        selection_divergence="jsd")
        expected = select_tokens(stats.entropy, jsd, mask, method, 0.5, divergence_normalization="bounded")
        assert torch.equal(out.keep, expected)
        # On this batch the two axes keep different tokens, so the check above tells them apart.
        assert not torch.equal(expected, select_tokens(stats.entropy, stats.reverse_kl, mask, method, 0.5))
        # Ranking only: the loss is still the reverse KL (beta = 1) of the kept tokens.
        torch.testing.assert_close(out.loss, stats.reverse_kl[out.keep].mean())
    by_kl = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method="divergence_topk", ratio=0.5)
    assert torch.equal(by_kl.keep, select_tokens(stats.entropy, stats.reverse_kl, mask, "divergence_topk", 0.5))
    soft_or = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method="soft_or", ratio=0.5,
                                        selection_divergence="jsd")
    torch.testing.assert_close(soft_or.divergence_hat, jsd.masked_fill(mask == 0, 0.0))
    with pytest.raises(ValueError, match="selection_divergence must be one of"):
        selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, selection_divergence="tvd")
