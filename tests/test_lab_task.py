"""The lab task: its data, its styles, its training helpers and the check of its preconditions."""

import random

import pytest
import torch

from tests.numerics import assert_reordered_close
from trl_tip import CONCISE_INSTRUCTIONS
from trl_tip.rewards import math_reward
from trl_tip.tasks import LabTask, build_lab_dataset, check_preconditions, styled_split
from trl_tip.tasks.lab import (
    CONCISE_PARAPHRASES,
    HELD_OUT_PARAPHRASE,
    LAB_MAX_COMPLETION_TOKENS,
    carries,
    checked_solution,
    concise_solution,
    solution_for,
    verbose_solution,
)
from trl_tip.tasks.lab_preparation import _style_groups, _tokenised_group, prefix_shared_logits
from trl_tip.tiny_models import build_tokenizer, tiny_model


def test_styles_of_one_problem():
    assert concise_solution(58, 67) == "8+7=15;5+6+1=12;\\boxed{125}"
    assert checked_solution(58, 67) == "8+7=15;5+6+1=12;check 58+67=125;\\boxed{125}"
    assert verbose_solution(58, 67) == (
        "58+67: add the columns from the right.\n8+7=15, carry 1\n5+6+1=12, carry 1\ncheck: 8+7=15, 5+6+1=12\n"
        "so 58+67=125\n\\boxed{125}"
    )
    assert [carries(23, 41), carries(58, 34), carries(73, 52), carries(58, 67), carries(99, 99)] == [0, 1, 1, 2, 2]
    # v2 keeps a check line on the difficult level only; v1 and the paraphrases never do.
    assert solution_for(58, 34, "v2") == concise_solution(58, 34)
    assert solution_for(58, 67, "v2") == checked_solution(58, 67)
    assert solution_for(58, 67, "v1") == solution_for(58, 67, "paraphrase") == concise_solution(58, 67)
    assert solution_for(58, 67, "plain") == solution_for(58, 67, "privileged") == verbose_solution(58, 67)


def test_verbose_style_is_at_least_three_times_the_concise_one_on_every_problem():
    tokenizer = build_tokenizer()
    for a in range(10, 100):
        for b in range(10, 100):
            verbose = len(tokenizer(verbose_solution(a, b))["input_ids"])
            concise = len(tokenizer(concise_solution(a, b))["input_ids"])
            assert verbose >= 3 * concise, (a, b, verbose, concise)
            # The generation limit holds the longest solution and its end of turn.
            assert verbose + 1 <= LAB_MAX_COMPLETION_TOKENS


def test_splits_are_disjoint_balanced_and_carry_the_columns_the_methods_read():
    data = build_lab_dataset()
    assert {name: len(split) for name, split in data.items()} == {"train": 4500, "validation": 90, "test": 180}
    prompts = {name: {row[0]["content"] for row in split["prompt"]} for name, split in data.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert sorted(data["test"]["level"]) == sorted([0, 1, 2] * 60)
    for row in (data["train"][0], data["test"][5]):
        a, b = map(int, row["prompt"][0]["content"].split("+"))
        assert row["answer"] == str(a + b)
        assert row["solution"] == concise_solution(a, b)
        assert row["completion"][0]["content"] == verbose_solution(a, b)
        assert row["level"] == carries(a, b)
    for split in data.values():
        assert math_reward([[{"role": "assistant", "content": s}] for s in split["solution"]],
                           answer=list(split["answer"])) == [1.0] * len(split)
    # The levels take turns, so a prefix of the split (PACED and the bridge train on one) is balanced.
    assert data["train"]["level"][:6] == [0, 1, 2, 0, 1, 2]


def test_task_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="level 0 has only 1980"):
        LabTask(num_train_per_level=2000)


def test_instructed_prompts_use_the_exact_instruction_texts():
    test = build_lab_dataset()["test"]
    for key in ("v1", "v2"):
        content = styled_split(test, key)[0]["prompt"][-1]["content"]
        assert content == f"{CONCISE_INSTRUCTIONS[key]}\n\n{test[0]['prompt'][-1]['content']}"
    unseen = styled_split(test, "paraphrase", HELD_OUT_PARAPHRASE)[0]["prompt"][-1]["content"]
    assert unseen.startswith(HELD_OUT_PARAPHRASE) and HELD_OUT_PARAPHRASE not in CONCISE_PARAPHRASES


def test_prefix_shared_logits_and_gradients_equal_the_full_forward():
    # The instruction is run once and its cache repeated over the batch: the same function of the weights as running
    # every row in full, up to float32 summation order (tests/numerics.py).
    tokenizer = build_tokenizer()
    train = build_lab_dataset()["train"].select(range(6))  # levels 0, 1, 2, 0, 1, 2
    group = _style_groups(tokenizer, train, {"v2": 1.0}, seed=0)[0][1]
    assert group.prefix is not None and group.prefix.numel() > 400
    model = tiny_model("teacher", seed=0, tokenizer=tokenizer, max_position_embeddings=1024)
    ids, attention = group.input_ids, group.attention
    full_ids = torch.cat([group.prefix.expand(len(ids), -1), ids], dim=1)
    full_attention = torch.cat([torch.ones(len(ids), group.prefix.numel(), dtype=attention.dtype), attention], dim=1)
    real = attention.bool()
    probe = torch.linspace(-1, 1, model.config.vocab_size)

    def logits_and_gradients(forward):
        model.zero_grad()
        logits = forward()
        (logits[real] * probe).sum().backward()
        return logits.detach()[real], [p.grad.clone() for p in model.parameters()]

    shared, shared_grads = logits_and_gradients(lambda: prefix_shared_logits(model, group.prefix, ids, attention))
    full, full_grads = logits_and_gradients(
        lambda: model(input_ids=full_ids, attention_mask=full_attention).logits[:, group.prefix.numel():])
    assert_reordered_close(shared, full)
    for shared_grad, full_grad in zip(shared_grads, full_grads, strict=True):
        assert_reordered_close(shared_grad, full_grad)


def test_tokenised_groups_mask_only_the_completion_and_balance_levels():
    tokenizer = build_tokenizer()
    prompts = [[{"role": "user", "content": "23+41"}], [{"role": "user", "content": "58+34"}],
               [{"role": "user", "content": "73+52"}]]
    completions = [verbose_solution(23, 41), verbose_solution(58, 34), verbose_solution(73, 52)]
    group = _tokenised_group(tokenizer, prompts, completions, False, [0, 1, 1])
    for row, completion in enumerate(completions):
        target = group.input_ids[row][group.loss_mask[row].bool()]
        assert tokenizer.decode(target) == completion + tokenizer.eos_token
    # Level 0 has one row and level 1 two: a row of level 0 is drawn twice as often as one of level 1.
    assert group.row_weights.tolist() == [1.0, 0.5, 0.5]


def _measured(ratio=0.3, difference=0.0, between=0.4, zero=0.2, one=0.1, teacher=(1.0, 0.98, 0.96)):
    mode = {"token_ratio": ratio, "accuracy_difference": difference}
    return {
        "concise_mode": {"v1": mode, "v2": mode},
        "student_pass_rates": {"between": between, "zero": zero, "one": one},
        "teacher": {"levels": {str(level): {"accuracy": a} for level, a in zip((0, 1, 2), teacher)}},
    }


def test_check_preconditions_names_each_one_that_fails():
    assert check_preconditions(_measured()) == []
    assert check_preconditions(_measured(ratio=0.5, difference=-0.02)) == []  # the bounds are inclusive
    assert "writes 51 %" in " ".join(check_preconditions(_measured(ratio=0.51)))
    assert "+2.5 points" in " ".join(check_preconditions(_measured(difference=0.025)))
    assert "student pass rates" in " ".join(check_preconditions(_measured(between=0.29)))
    assert "student pass rates" in " ".join(check_preconditions(_measured(one=0.0)))
    assert "student pass rates" in " ".join(check_preconditions(_measured(zero=0.0)))
    failures = check_preconditions(_measured(teacher=(1.0, 0.98, 0.5)))
    assert failures == ["teacher accuracy 50.0 % on level 2 (at least 95 % required)"]
    # A level the student is not asked to learn is not held to the teacher's bar.
    assert check_preconditions(_measured(teacher=(1.0, 0.98, 0.5)), student_levels=(0, 1)) == []
