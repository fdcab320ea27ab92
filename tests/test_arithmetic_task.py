import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_tip.rewards import math_reward
from trl_tip.tasks import ArithmeticTask, build_arithmetic_dataset, evaluate_accuracy, worked_solution


def test_worked_solution_writes_carries():
    assert worked_solution(99, 80) == "9+0=9;9+8=17;\\boxed{179}"
    assert worked_solution(58, 67) == "8+7=15;5+6+1=12;\\boxed{125}"
    assert worked_solution(10, 10) == "0+0=0;1+1=2;\\boxed{20}"


def test_splits_are_disjoint_and_in_trl_format():
    data = build_arithmetic_dataset()
    assert {name: len(split) for name, split in data.items()} == {"train": 7000, "validation": 200, "test": 300}
    prompts = {name: {row[0]["content"] for row in split["prompt"]} for name, split in data.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    row = data["train"][0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    a, b = map(int, row["prompt"][0]["content"].split("+"))
    assert row["answer"] == str(a + b)


def test_reference_solutions_verify_with_the_reward():
    test = build_arithmetic_dataset()["test"]
    assert math_reward(list(test["completion"]), answer=list(test["answer"])) == [1.0] * len(test)


def test_same_seed_same_split_other_seed_other_split():
    a = build_arithmetic_dataset(ArithmeticTask(seed=0))["test"]["answer"]
    assert list(a) == list(build_arithmetic_dataset(ArithmeticTask(seed=0))["test"]["answer"])
    assert list(a) != list(build_arithmetic_dataset(ArithmeticTask(seed=1))["test"]["answer"])


def test_task_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="distinct problems"):
        ArithmeticTask(num_digits=1, num_train=100)


@pytest.mark.slow
def test_builtin_teacher_and_student_hit_their_targets(arithmetic_models):
    # Re-measure on the held-out test split from the saved files, rather than trusting the stored numbers. How long the
    # preparation took is recorded in the metrics and reported by the docs, never asserted: it depends on the machine.
    metrics = arithmetic_models["metrics"]
    test = arithmetic_models["dataset"]["test"]
    for role, low, high in (("teacher", 0.95, 1.0), ("student", 0.10, 0.60)):
        tokenizer = AutoTokenizer.from_pretrained(arithmetic_models[role])
        model = AutoModelForCausalLM.from_pretrained(arithmetic_models[role])
        accuracy = evaluate_accuracy(model, tokenizer, test)["accuracy"]
        assert low <= accuracy <= high, (role, accuracy)
        assert accuracy == pytest.approx(metrics[f"{role}_test_accuracy"])
    stored = json.loads((Path(arithmetic_models["teacher"]).parent / "metrics.json").read_text())
    assert stored == metrics
