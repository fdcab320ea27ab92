import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_tip.evaluation as evaluation
from trl_tip import evaluate_pass_at_k, pass_at_k
from trl_tip.testing import build_tokenizer


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 4, 1 - 35 / 210),  # C(7,4) = 35, C(10,4) = 210
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (6, 4, 3, 1.0),  # n - c < k: every draw of 3 contains a correct sample
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_large_n_is_stable():
    assert all(pass_at_k(16, c, 1) == pytest.approx(c / 16) for c in range(17))
    # Large binomials do not overflow: 1 - (1 - 1/1000)^... is computed exactly from integers.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 1, 1) < pass_at_k(1000, 1, 2) < 1.0


@pytest.mark.parametrize(
    "n, c, k, error, message",
    [
        (0, 0, 1, ValueError, "n >= 1"),
        (4, 5, 1, ValueError, "0 <= c <= n"),
        (4, -1, 1, ValueError, "0 <= c <= n"),
        (4, 1, 0, ValueError, "1 <= k <= n"),
        (4, 1, 5, ValueError, "1 <= k <= n"),
        (4.0, 1, 1, TypeError, "integer n"),
        (4, True, 1, TypeError, "integer c"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n, c, k, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(n, c, k)


def test_evaluate_pass_at_k_aggregates_graded_samples(monkeypatch):
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "2+2"}]], "answer": ["2", "4"]}
    )
    # Problem 1: one correct sample of four; problem 2: three of four (one without an answer at all).
    scripted = ["\\boxed{2}", "\\boxed{3}", "\\boxed{5}", "no answer", "\\boxed{4}", "\\boxed{4}", "Answer: 4", "x"]
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature):
        calls.append({"prompts": prompts, "do_sample": do_sample, "temperature": temperature, "max": max_new_tokens})
        return scripted

    monkeypatch.setattr(evaluation, "generate_completions", fake_generate)
    model = SimpleNamespace(device=torch.device("cpu"))  # only its device is read
    tokenizer = build_tokenizer()
    result = evaluate_pass_at_k(model, tokenizer, dataset, num_samples=4, max_new_tokens=16, temperature=0.7)

    assert calls[0]["prompts"] == [dataset[0]["prompt"]] * 4 + [dataset[1]["prompt"]] * 4
    assert (calls[0]["do_sample"], calls[0]["temperature"], calls[0]["max"]) == (True, 0.7, 16)
    assert result["mean_accuracy"] == pytest.approx(0.5)
    expected = {1: (0.25 + 0.75) / 2, 2: (0.5 + 1.0) / 2, 3: (0.75 + 1.0) / 2, 4: 1.0}
    assert result["pass_at_k"] == pytest.approx(expected)
    # One token per byte plus the end-of-turn token.
    assert result["mean_completion_tokens"] == pytest.approx(sum(len(text) + 1 for text in scripted) / 8)
    assert (result["num_problems"], result["num_samples"]) == (2, 4)


def test_evaluate_pass_at_k_on_a_model_is_seeded_and_leaves_the_random_state(tiny_model_paths):
    path = tiny_model_paths["student"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{a}+1"}] for a in (3, 4, 5)]})
    dataset = dataset.add_column("answer", ["4", "5", "6"])

    torch.manual_seed(123)
    first = evaluate_pass_at_k(model, tokenizer, dataset, num_samples=3, max_new_tokens=6, seed=7)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = evaluate_pass_at_k(model, tokenizer, dataset, num_samples=3, max_new_tokens=6, seed=7)
    assert torch.equal(torch.rand(1), after_first)  # the evaluation drew nothing from the global stream
    assert first == second
    assert sorted(first["pass_at_k"]) == [1, 2, 3]
    assert all(0.0 <= value <= 1.0 for value in first["pass_at_k"].values())
    assert first["mean_completion_tokens"] >= 1
    assert math.isclose(first["pass_at_k"][1], first["mean_accuracy"])


def test_evaluate_pass_at_k_rejects_bad_input():
    tokenizer = build_tokenizer()
    model = SimpleNamespace(device=torch.device("cpu"))
    without_answers = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]]})
    with pytest.raises(ValueError, match="`answer` column"):
        evaluate_pass_at_k(model, tokenizer, without_answers)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        evaluate_pass_at_k(model, tokenizer, without_answers.add_column("answer", ["2"]), num_samples=0)

