import math

import pytest
import torch

from trl_tip import SELECTION_METHODS, select_tokens
from trl_tip.selection import (
    min_max_normalize,
    normalized_divergence,
    overconfidence_score,
    quadrant_counts,
    quantile,
    soft_or_score,
    tokens_per_rollout,
    top_per_rollout,
)


def _mask(lengths, width):
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_tokens_per_rollout_floor_min_one_and_empty():
    mask = _mask([10, 3, 1, 0, 7], 10)
    assert tokens_per_rollout(mask, 0.5).tolist() == [5, 1, 1, 0, 3]
    assert tokens_per_rollout(mask, 1.0).tolist() == [10, 3, 1, 0, 7]
    assert tokens_per_rollout(mask, 0.2).tolist() == [2, 1, 1, 0, 1]
    # ⌊0.29·100⌋ = 29 although 0.29·100 = 28.999... in floating point.
    assert tokens_per_rollout(torch.ones(1, 100), 0.29).tolist() == [29]


def test_quantile_and_min_max_match_hand_values():
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert quantile(values, 0.5).item() == 2.0
    assert quantile(values, 0.98).item() == pytest.approx(3.92)
    assert quantile(values, 0.98).item() == pytest.approx(torch.quantile(values, 0.98).item())
    mask = torch.tensor([True, True, True, False, True])
    assert min_max_normalize(values, mask).tolist() == [0.0, 0.25, 0.5, 0.0, 1.0]
    assert min_max_normalize(torch.full((4,), 3.0), torch.ones(4, dtype=torch.bool)).tolist() == [0.0] * 4


def test_soft_or_score_hand_computed():
    # One rollout of 4 tokens; the 98th-percentile clip is disabled so the numbers are easy to follow.
    entropy = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    divergence = torch.tensor([[2.0, 0.0, 1.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    h_hat = torch.tensor([0.0, 0.5, 1.0, 0.25])
    d_hat = torch.tensor([0.5, 0.0, 0.25, 1.0])
    expected = h_hat + d_hat - h_hat * d_hat  # [0.5, 0.5, 1.0, 1.0]
    score = soft_or_score(entropy, divergence, mask, entropy_clip_quantile=1.0)
    torch.testing.assert_close(score[0], expected)
    # Top-2 of [0.5, 0.5, 1.0, 1.0] are positions 2 and 3.
    keep = select_tokens(entropy, divergence, mask, "soft_or", ratio=0.5, entropy_clip_quantile=1.0)
    assert keep[0].tolist() == [False, False, True, True]


def test_soft_or_entropy_clip_at_batch_quantile():
    # One outlier entropy; clipping at the 50% quantile (1.0) caps it, so the others keep their spread.
    entropy = torch.tensor([[0.0, 1.0, 2.0, 100.0]])
    divergence = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    q = torch.quantile(entropy[0], 0.5).item()  # 1.5
    clipped = torch.clamp(entropy[0], max=q)
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    torch.testing.assert_close(soft_or_score(entropy, divergence, mask, entropy_clip_quantile=0.5)[0], expected)


def test_statistics_are_over_the_whole_batch_not_per_rollout():
    entropy = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    divergence = torch.zeros(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    score = soft_or_score(entropy, divergence, mask, entropy_clip_quantile=1.0)
    torch.testing.assert_close(score, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))


def test_overconfidence_score_hand_computed():
    entropy = torch.tensor([[0.0, 1.0, 0.5]])
    forward_kl = torch.tensor([[2.0, 5.0, 4.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    score = overconfidence_score(entropy, forward_kl, mask, entropy_clip_quantile=1.0)
    torch.testing.assert_close(score[0], torch.tensor([2.0, 0.0, 2.0]))
    keep = select_tokens(entropy, torch.zeros(1, 3), mask, "overconfident", ratio=0.34, forward_kl=forward_kl,
                         entropy_clip_quantile=1.0)
    assert keep[0].tolist() == [True, False, False]  # tie 2.0 vs 2.0 goes to the earlier position


@pytest.mark.parametrize("method", [m for m in SELECTION_METHODS if m != "all"])
def test_every_rule_keeps_exact_per_rollout_counts_and_respects_the_mask(method):
    generator = torch.Generator().manual_seed(0)
    lengths = [12, 5, 1, 0, 9]
    mask = _mask(lengths, 12)
    entropy = torch.rand(5, 12, generator=generator)
    divergence = torch.rand(5, 12, generator=generator)
    forward_kl = torch.rand(5, 12, generator=generator)
    keep = select_tokens(entropy, divergence, mask, method, ratio=0.5, forward_kl=forward_kl, generator=generator)
    assert keep.dtype == torch.bool
    assert not (keep & ~mask).any()
    assert keep.sum(-1).tolist() == [6, 2, 1, 0, 4]
    # ρ = 1 keeps every completion token whatever the rule.
    keep_all = select_tokens(entropy, divergence, mask, method, ratio=1.0, forward_kl=forward_kl, generator=generator)
    assert torch.equal(keep_all, mask)


def test_all_ignores_ratio_and_returns_the_mask():
    mask = _mask([3, 0, 2], 4)
    keep = select_tokens(torch.rand(3, 4), torch.rand(3, 4), mask, "all", ratio=0.1)
    assert torch.equal(keep, mask)


def test_topk_rules_pick_the_highest_scores_per_rollout():
    entropy = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.0, 0.0]])
    divergence = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 1.0, 0.0, 0.0]])
    mask = _mask([4, 2], 4)
    keep = select_tokens(entropy, divergence, mask, "entropy_topk", ratio=0.5)
    assert keep.tolist() == [[True, False, False, True], [False, True, False, False]]
    keep = select_tokens(entropy, divergence, mask, "divergence_topk", ratio=0.5)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_ties_and_all_equal_scores_go_to_the_earliest_positions():
    mask = _mask([6], 6)
    flat = torch.full((1, 6), 0.3)
    for method in ("entropy_topk", "divergence_topk", "soft_or"):
        keep = select_tokens(flat, flat, mask, method, ratio=0.5)
        assert keep[0].tolist() == [True, True, True, False, False, False], method


def test_padding_scores_never_win():
    # Huge scores on padding positions must not be selected.
    entropy = torch.tensor([[0.1, 0.2, 99.0, 99.0]])
    mask = _mask([2], 4)
    keep = select_tokens(entropy, entropy, mask, "entropy_topk", ratio=0.5)
    assert keep[0].tolist() == [False, True, False, False]


def test_single_token_rollout_and_empty_batch():
    mask = _mask([1], 3)
    keep = select_tokens(torch.rand(1, 3), torch.rand(1, 3), mask, "soft_or", ratio=0.1)
    assert keep[0].tolist() == [True, False, False]
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert not select_tokens(torch.rand(2, 3), torch.rand(2, 3), empty, "soft_or").any()


def test_random_is_uniform_and_reproducible():
    mask = _mask([4], 4)
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2000):
        counts += select_tokens(torch.rand(1, 4), torch.rand(1, 4), mask, "random", 0.5, generator=generator)[0]
    torch.testing.assert_close(counts / 2000, torch.full((4,), 0.5), atol=0.04, rtol=0)
    a = select_tokens(torch.zeros(1, 4), torch.zeros(1, 4), mask, "random", 0.5, generator=torch.Generator().manual_seed(7))
    b = select_tokens(torch.zeros(1, 4), torch.zeros(1, 4), mask, "random", 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_entropy_sample_follows_the_entropy_and_skips_zero_weight():
    # Sampling one of three tokens with weights 1:3:0 -> inclusion frequencies 0.25, 0.75, 0.
    entropy = torch.tensor([[0.1, 0.3, 0.0]])
    mask = _mask([3], 3)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts += select_tokens(entropy, torch.zeros(1, 3), mask, "entropy_sample", 0.34, generator=generator)[0]
    torch.testing.assert_close(counts / 4000, torch.tensor([0.25, 0.75, 0.0]), atol=0.03, rtol=0)
    # A rollout whose entropy is zero everywhere is sampled uniformly, still with the right count.
    zero = select_tokens(torch.zeros(1, 4), torch.zeros(1, 4), _mask([4], 4), "entropy_sample", 0.5, generator=generator)
    assert zero.sum().item() == 2


def test_quadrants_split_at_batch_medians():
    entropy = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5]])
    divergence = torch.tensor([[5.0, 0.1, 4.0, 0.2, 1.0]])
    # medians: h 0.5, δ 1.0 -> (high h, high δ), (high h, low δ), (low h, high δ), (low, low), (low, low)
    assert quadrant_counts(entropy, divergence, _mask([5], 5)).tolist() == [1.0, 1.0, 1.0, 2.0]


def test_top_per_rollout_handles_counts_above_length():
    mask = _mask([2], 4)
    keep = top_per_rollout(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), mask, torch.tensor([10]))
    assert keep[0].tolist() == [True, True, False, False]


def test_bad_arguments_are_clear_errors():
    x, mask = torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="Unknown token selection method 'best'"):
        select_tokens(x, x, mask, "best")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        select_tokens(x, x, mask, "soft_or", ratio=0.0)
    with pytest.raises(ValueError, match="pass `forward_kl`"):
        select_tokens(x, x, mask, "overconfident")
    with pytest.raises(ValueError, match="same \\(batch, tokens\\) shape"):
        select_tokens(x, torch.rand(2, 4), mask)
    assert math.isclose(quantile(torch.tensor([5.0]), 0.98).item(), 5.0)


# ---------------------------------------------------------------------------------------------------------------------
# Tests that pin soft-OR's formula and the scope of its statistics (each fails under the named mutation)


def test_soft_or_is_not_the_max_of_the_two_axes():
    # Rollout 0 fixes the batch ranges: h and δ both span [0, 1], so ĥ = h and δ̂ = δ for every token. In rollout 1,
    # token a has ĥ = δ̂ = 0.6 (soft-OR 1 − 0.4·0.4 = 0.84, max 0.6) and token b has ĥ = 0.8, δ̂ = 0 (soft-OR 0.8,
    # max 0.8): soft-OR keeps a, max(ĥ, δ̂) would keep b.
    entropy = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    divergence = torch.tensor([[0.0, 1.0], [0.6, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    score = soft_or_score(entropy, divergence, mask, entropy_clip_quantile=1.0)
    torch.testing.assert_close(score, torch.tensor([[0.0, 1.0], [0.84, 0.8]]))
    keep = select_tokens(entropy, divergence, mask, "soft_or", ratio=0.5, entropy_clip_quantile=1.0)
    assert keep.tolist() == [[False, True], [True, False]]


def test_divergence_is_normalised_over_the_batch_not_per_rollout():
    # Rollout 0 holds the batch's δ range [0, 10] and h range [0, 1]. In rollout 1, a = (h 0.5, δ 0.1) and
    # b = (h 0.3, δ 0.2). Over the batch δ̂ = δ / 10: s_a = 0.5 + 0.01 − 0.005 = 0.505, s_b = 0.3 + 0.02 − 0.006 =
    # 0.314, so a is kept. Min-max within rollout 1 alone would give δ̂_a = 0, δ̂_b = 1 and keep b.
    entropy = torch.tensor([[0.0, 1.0], [0.5, 0.3]])
    divergence = torch.tensor([[0.0, 10.0], [0.1, 0.2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    score = soft_or_score(entropy, divergence, mask, entropy_clip_quantile=1.0)
    torch.testing.assert_close(score[1], torch.tensor([0.505, 0.314]))
    keep = select_tokens(entropy, divergence, mask, "soft_or", ratio=0.5, entropy_clip_quantile=1.0)
    assert keep[1].tolist() == [True, False]


def test_divergence_clip_quantile_hand_computed():
    # One outlier (100) among δ = 0, 1, 2, 3: unclipped, δ̂ = δ / 100 squashes the others below 0.03. Clipped at the
    # 75th percentile (linear interpolation over 5 values: position 3, i.e. 3.0), δ̂ = min(δ, 3) / 3.
    divergence = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    torch.testing.assert_close(normalized_divergence(divergence, mask), divergence / 100)
    torch.testing.assert_close(
        normalized_divergence(divergence, mask, divergence_clip_quantile=0.75),
        torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0, 1.0]]),
    )
    # In soft-OR: with zero entropy everywhere the score is δ̂ itself.
    torch.testing.assert_close(
        soft_or_score(torch.zeros(1, 5), divergence, mask, entropy_clip_quantile=1.0, divergence_clip_quantile=0.75),
        torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0, 1.0]]),
    )


def test_log_normal_outlier_squashes_divergence_axis_unless_clipped():
    # Heavy-tailed δ (log-normal, σ = 2): without a clip the median δ̂ is tiny; clipping at the 0.98 quantile restores
    # a spread. Bound: the median of a log-normal is e^μ = 1, its maximum over 4096 draws is above e^{2·3} ≈ 400.
    generator = torch.Generator().manual_seed(0)
    divergence = torch.exp(2.0 * torch.randn(1, 4096, generator=generator))
    mask = torch.ones_like(divergence, dtype=torch.bool)
    unclipped = normalized_divergence(divergence, mask)
    clipped = normalized_divergence(divergence, mask, divergence_clip_quantile=0.98)
    assert unclipped.median() < 1 / 100
    assert clipped.median() > 5 * unclipped.median()


def test_bounded_divergence_axis_is_used_as_is():
    jsd = torch.tensor([[0.1, 0.4, 0.0, 0.9]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(normalized_divergence(jsd, mask, normalization="bounded"), torch.tensor([[0.1, 0.4, 0.0, 0.0]]))
    # soft-OR with ĥ = [0, 0.5, 1]: 1 − (1 − ĥ)(1 − δ̂) = [0.1, 0.7, 1.0]; min-max would have made δ̂ = [0.25, 1, 0].
    entropy = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    score = soft_or_score(entropy, jsd, mask, entropy_clip_quantile=1.0, divergence_normalization="bounded")
    torch.testing.assert_close(score, torch.tensor([[0.1, 0.7, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="divergence_clip_quantile must be 1.0"):
        normalized_divergence(jsd, mask, divergence_clip_quantile=0.9, normalization="bounded")
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalized_divergence(jsd, mask, normalization="softmax")
    with pytest.raises(ValueError, match="divergence_clip_quantile must be in"):
        select_tokens(entropy, jsd, mask, "soft_or", divergence_clip_quantile=0.0)
