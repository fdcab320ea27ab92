import copy
import json
import math
from functools import partial

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DistillationConfig

from trl_tip import PacedConfig, PacedTrainer, PassRateTable, math_reward, paced_weight, selective_divergence_loss
import trl_tip.losses as losses_module
import reference
from builders import training_config
from numerics import REORDERING_TOLERANCE, GradientRecorder, assert_close_to_float64, assert_same_gradients
from trl_tip.losses import rollout_token_coefficients
from trl_tip.pass_rates import ProblemSampler, sampling_probabilities
from trl_tip.tasks import build_arithmetic_dataset
from trl_tip.tasks.arithmetic import generate_completions
from trl_tip.tiny_models import build_tokenizer
from trl_tip.trainers.paced import (
    PASS_RATE_FILE,
    add_privileged_context,
    completion_ids_until_eos,
    ema_update,
    paced_phase,
    pass_rates_from_rewards,
    schedule_switch_step,
)


# The counts asserted below (24 problems, 24 × 4 estimation rollouts) assume 24.
NUM_PROBLEMS = 24

_config = partial(training_config, PacedConfig, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                  max_completion_length=32, pass_rate_rollouts=4)


class ScriptedReward:
    """
    Grades the k-th rollout of a problem 1.0 when k < passes[problem] (else 0.0), whatever the completion says, so the
    pass rate of each problem is known in advance: passes / K. Problems map to None in `ungradable`.
    """

    __name__ = "scripted_reward"

    def __init__(self, passes: dict[str, int], ungradable=()):
        self.passes, self.ungradable, self.seen, self.calls = passes, set(ungradable), {}, 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        rewards = []
        for prompt in prompts:
            key = prompt[-1]["content"]
            count = self.seen.get(key, 0)
            self.seen[key] = count + 1
            rewards.append(None if key in self.ungradable else float(count < self.passes.get(key, 0)))
        return rewards


def _trainer(paths, config, dataset, reward_funcs=math_reward, **kwargs):
    teacher = kwargs.pop("teacher_model", None if config.self_distillation else paths["teacher"])
    return PacedTrainer(model=paths["student"], teacher_model=teacher, args=config, train_dataset=dataset,
                        reward_funcs=reward_funcs, **kwargs)


def _capture_batches(trainer):
    """Record every generation batch the trainer trains on (its inputs and the generated output)."""
    batches = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate(inputs)
        batches.append({"inputs": inputs, "output": output, "step": trainer.state.global_step})
        return output

    trainer._generate_and_score_completions = recording
    return batches


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# ---- The weight and the loss ----


def test_paced_weight_matches_hand_computed_values():
    torch.testing.assert_close(paced_weight([0.0, 0.25, 0.5, 0.75, 1.0]),
                               torch.tensor([0.0, 0.1875, 0.25, 0.1875, 0.0]))
    # α = 2, β = 1: p²(1 − p); α = 0.5, β = 1 at p = 0.25: 0.5 · 0.75.
    torch.testing.assert_close(paced_weight(torch.tensor([0.5, 0.75]), alpha=2.0, beta=1.0),
                               torch.tensor([0.125, 0.140625]))
    assert paced_weight(0.25, alpha=0.5, beta=1.0).item() == pytest.approx(0.375)
    assert paced_weight(0.25, alpha=1.0, beta=3.0).item() == pytest.approx(0.25 * 0.75**3)
    # α = β = 0: no weighting, including at p ∈ {0, 1}.
    torch.testing.assert_close(paced_weight([0.0, 0.3, 1.0], alpha=0.0, beta=0.0), torch.ones(3))
    assert paced_weight(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="alpha >= 0"):
        paced_weight([0.5], alpha=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paced_weight([1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paced_weight([math.nan])


def test_rollout_token_coefficients():
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([0.5, 0.25, 1.0])
    coefficients = rollout_token_coefficients(keep, weights, weight_sum=2.0)
    expected = torch.tensor([[0.125, 0.125, 0, 0], [0.03125] * 4, [0, 0, 0, 0]])
    torch.testing.assert_close(coefficients, expected)
    # Local normalisation by default; a zero weight sum gives zeros, not NaN.
    torch.testing.assert_close(rollout_token_coefficients(keep, weights).sum(), torch.tensor(0.75 / 1.75))
    assert torch.equal(rollout_token_coefficients(keep, torch.zeros(3)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        rollout_token_coefficients(keep, torch.tensor([0.5, -0.1, 0.0]))
    with pytest.raises(ValueError, match="3 rollouts"):
        rollout_token_coefficients(keep, torch.ones(2))


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("method", ["all", "divergence_topk"])
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_weighted_loss_is_the_weighted_mean_of_rollout_means(method, beta, compact, monkeypatch):
    # `compact`: score completion rows only, as on GPUs with Triton (the row bookkeeping is what differs; the tiles
    # still run on CPU).
    monkeypatch.setattr(losses_module, "use_triton", lambda device: compact)
    generator = torch.Generator().manual_seed(0)
    batch, length, hidden, vocab = 4, 6, 8, 23
    h_s = torch.randn(batch, length, hidden, generator=generator, requires_grad=True)
    h_t = torch.randn(batch, length, hidden, generator=generator)
    w_s = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    w_t = torch.randn(vocab, hidden, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    weights = torch.tensor([0.25, 0.0, 0.1875, 0.09375])
    weight_sum = torch.tensor(0.8)  # the global batch holds more weight than this micro-batch

    result = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, method=method, ratio=0.5,
                                       rollout_weights=weights, weight_sum=weight_sum)
    result.loss.backward()

    h_ref = h_s.detach().clone().requires_grad_(True)
    w_ref = w_s.detach().clone().requires_grad_(True)
    divergence = reference.generalized_jsd(reference.logits(h_ref, w_ref), reference.logits(h_t, w_t), beta)
    expected = reference.paced_loss(divergence, result.keep, weights, 0.8)
    expected.backward()

    if method == "all":
        assert torch.equal(result.keep, mask.bool())
    logit_scale = max((h_ref @ w_ref.t()).abs().max().item(), (h_t @ w_t.t()).abs().max().item())
    assert_close_to_float64(result.loss, expected.detach(), scale=logit_scale)
    # Gradients carry the logits' relative rounding times their own magnitude (see tests/numerics.py).
    assert_close_to_float64(h_s.grad, h_ref.grad, scale=logit_scale * h_ref.grad.abs().max().item())
    assert_close_to_float64(w_s.grad, w_ref.grad, scale=logit_scale * w_ref.grad.abs().max().item())
    # A rollout of weight 0 receives no gradient at all.
    assert torch.equal(h_s.grad[1], torch.zeros_like(h_s.grad[1]))


def test_all_zero_weights_give_an_exact_zero_loss_with_zero_gradients():
    generator = torch.Generator().manual_seed(1)
    h_s = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    w_s = torch.randn(11, 8, generator=generator, requires_grad=True)
    h_t, w_t = torch.randn(3, 5, 8, generator=generator), torch.randn(11, 8, generator=generator)
    mask = torch.ones(3, 5, dtype=torch.long)
    for weight_sum in (None, torch.tensor(0.0)):
        result = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method="all",
                                           rollout_weights=torch.zeros(3), weight_sum=weight_sum)
        assert result.loss.item() == 0.0 and result.loss.requires_grad
        result.loss.backward()
        assert torch.equal(h_s.grad, torch.zeros_like(h_s)) and torch.equal(w_s.grad, torch.zeros_like(w_s))


# ---- Pure helpers ----


def test_pass_rates_from_rewards_and_online_update():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [math.nan, 1.0, math.nan, 0.0],
                            [math.nan] * 4])
    rates, graded = pass_rates_from_rewards(rewards)
    torch.testing.assert_close(rates[:3], torch.tensor([0.75, 0.0, 0.5]))
    assert math.isnan(rates[3].item()) and graded.tolist() == [4, 4, 2, 0]

    table = torch.tensor([0.5, 0.0, math.nan, 1.0])
    # Problem 0 drawn twice (mean reward 0.5), problem 2 unknown so far, an ungraded rollout of problem 3 ignored.
    updated = ema_update(table, torch.tensor([0, 0, 2, 3]), torch.tensor([1.0, 0.0, 1.0, math.nan]), rate=0.25)
    torch.testing.assert_close(updated, torch.tensor([0.5, 0.0, 1.0, 1.0]))
    updated = ema_update(table, torch.tensor([1]), torch.tensor([1.0]), rate=0.25)
    assert updated[1].item() == 0.25 and table[1].item() == 0.0


def test_schedule_phases():
    assert schedule_switch_step(10, 0.5) == 5 and schedule_switch_step(10, 0.33) == 3
    phases = [paced_phase(step, 4, "forward_then_reverse", 0.5, "student") for step in range(4)]
    assert phases == [(0.0, "teacher"), (0.0, "teacher"), (1.0, "student"), (1.0, "student")]
    assert paced_phase(3, 4, "forward", 0.5, "teacher") == (0.0, "teacher")
    assert paced_phase(0, 4, "reverse", 0.5, "student") == (1.0, "student")


def test_helpers_for_completions_and_privileged_prompts():
    ids = torch.tensor([[5, 6, 9, 7, 9], [1, 2, 3, 4, 5]])
    assert completion_ids_until_eos(ids, [9]) == [[5, 6, 9], [1, 2, 3, 4, 5]]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "58+67"}]
    teacher_prompt = add_privileged_context(prompt, "125", "{problem} (answer: {answer})")
    assert teacher_prompt[-1]["content"] == "58+67 (answer: 125)" and prompt[-1]["content"] == "58+67"
    assert add_privileged_context("2+2", 4, "{problem}={answer}") == "2+2=4"
    assert add_privileged_context("2+2", 4, "{problem}={context}") == "2+2=4"


def test_privileged_context_is_the_reference_solution_when_there_is_one():
    from trl_tip.trainers.paced import ANSWER_PROMPT_TEMPLATE, SOLUTION_PROMPT_TEMPLATE, privileged_context_setup

    assert privileged_context_setup(["prompt", "solution", "answer"], None, None) == ("solution", SOLUTION_PROMPT_TEMPLATE)
    assert privileged_context_setup(["prompt", "answer"], None, None) == ("answer", ANSWER_PROMPT_TEMPLATE)
    assert privileged_context_setup(["prompt", "worked", "answer"], "worked", None) == ("worked", SOLUTION_PROMPT_TEMPLATE)
    assert privileged_context_setup(["prompt", "answer"], None, "{problem}|{context}") == ("answer", "{problem}|{context}")
    with pytest.raises(ValueError, match="privileged_context_column"):
        privileged_context_setup(["prompt", "answer"], "worked", None)
    with pytest.raises(ValueError, match="Add a `solution`"):
        privileged_context_setup(["prompt"], None, None)
    # The OPSD authors' teacher layout for a reference solution.
    assert add_privileged_context("1+1?", "1+1 = 2.", SOLUTION_PROMPT_TEMPLATE) == (
        "## Problem\n1+1?\n\n## Reference Solution\n1+1 = 2.\n\nAfter understanding the reference solution, solve the "
        "problem step by step using your own approach."
    )


def test_pass_rate_table_weights_histogram_and_export():
    table = PassRateTable(5)
    table.set_estimate(torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 0.25, 0.5, 1.0]), torch.tensor([4, 4, 4, 4]))
    torch.testing.assert_close(table.weights(1.0, 1.0), torch.tensor([0.0, 0.1875, 0.25, 0.0, 0.0]))
    histogram = table.histogram()
    assert histogram["0"] == histogram["0_25"] == histogram["25_50"] == histogram["1"] == histogram["unknown"] == 0.2
    exported = table.to_dataset(Dataset.from_dict({"prompt": list("abcde")}))
    assert exported["prompt"] == list("abcde") and exported["pass_rate"][4] is None
    assert exported["weight"] == pytest.approx([0.0, 0.1875, 0.25, 0.0, 0.0])
    restored = PassRateTable(5)
    restored.load_state_dict(json.loads(json.dumps(table.state_dict())))
    assert torch.equal(restored.pass_rates.nan_to_num(-1), table.pass_rates.nan_to_num(-1))
    with pytest.raises(ValueError, match="covers 5 problems"):
        PassRateTable(6).load_state_dict(table.state_dict())
    assert "p=0: 20.0%" in table.summary()


# ---- Configuration and construction ----


def test_config_validation():
    base = {"bf16": False}
    config = PacedConfig(**base)
    assert (config.paced_alpha, config.paced_beta, config.pass_rate_rollouts, config.pass_rate_mode,
            config.rollout_source, config.kl_schedule, config.schedule_switch_fraction, config.self_distillation,
            config.token_selection, config.beta) == (1.0, 1.0, 8, "once", "student", None, 0.5, False, "all", 1.0)
    assert PacedConfig(kl_schedule="forward", **base).beta == 0.0
    # Without a schedule, `beta` is TRL's: here the β = 0.5 generalised JSD, throughout.
    assert PacedConfig(beta=0.5, **base).beta == 0.5
    assert paced_phase(3, 4, None, 0.5, "student", beta=0.5) == (0.5, "student")
    cases = [
        ({"paced_alpha": -0.5}, "paced_alpha and paced_beta must be >= 0"),
        ({"pass_rate_rollouts": 0}, "pass_rate_rollouts"),
        ({"pass_rate_mode": "refresh"}, "needs pass_rate_refresh_steps"),
        ({"pass_rate_refresh_steps": 10}, "only used with pass_rate_mode='refresh'"),
        ({"pass_rate_mode": "sometimes"}, "pass_rate_mode must be one of"),
        ({"pass_rate_ema": 0.0}, "pass_rate_ema"),
        ({"rollout_source": "dataset"}, "rollout_source must be one of"),
        ({"kl_schedule": "jsd"}, "kl_schedule must be None or one of"),
        ({"schedule_switch_fraction": 1.0}, "schedule_switch_fraction"),
        ({"beta": 0.5, "kl_schedule": "reverse"}, "conflicts with kl_schedule='reverse'.*Leave kl_schedule unset"),
        ({"beta": 0.5, "kl_schedule": "forward"}, "conflicts with kl_schedule='forward'"),
        ({"kl_schedule": "forward_then_reverse", "rollout_source": "teacher"}, "must stay 'student'"),
        ({"pass_rate_mode": "online", "rollout_source": "teacher"}, "draws none"),
        ({"self_distillation": True, "teacher_model_name_or_path": "x"}, "unset teacher_model_name_or_path"),
        ({"privileged_prompt_template": "{problem}"}, r"both \{problem\} and \{context\}"),
        ({"privileged_context_column": "solution"}, "needs self_distillation=True"),
        ({"privileged_prompt_template": "{problem} {answer} {hint}"}, "only use the placeholders"),
        ({"teacher_completions": "cache"}, "teacher_completions must be one of"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            PacedConfig(**base, **overrides)


def test_construction_errors_are_clear(tiny_model_paths, problems, tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="needs `reward_funcs`"):
        _trainer(tiny_model_paths, config, problems, reward_funcs=None)
    with pytest.raises(ValueError, match="Unknown reward 'accuracy'"):
        _trainer(tiny_model_paths, config, problems, reward_funcs="accuracy")
    with pytest.raises(ValueError, match="no `answer` column"):
        _trainer(tiny_model_paths, config, problems.remove_columns("answer"))
    with pytest.raises(ValueError, match="lacks"):
        _trainer(tiny_model_paths, _config(tmp_path, rollout_source="teacher", teacher_completions="dataset"),
                 problems.remove_columns("completion"))
    with pytest.raises(ValueError, match="needs a teacher"):
        PacedTrainer(model=tiny_model_paths["student"], args=config, train_dataset=problems, reward_funcs="math")
    with pytest.raises(ValueError, match="do not pass `teacher_model`"):
        _trainer(tiny_model_paths, _config(tmp_path, self_distillation=True), problems,
                 teacher_model=tiny_model_paths["teacher"])
    with pytest.raises(ValueError, match="map-style"):
        _trainer(tiny_model_paths, config, problems.to_iterable_dataset())
    with pytest.raises(TypeError, match="needs a PacedConfig"):
        PacedTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                     args=DistillationConfig(str(tmp_path), bf16=False), train_dataset=problems, reward_funcs="math")


# ---- Pass-rate estimation ----


def test_estimation_recovers_scripted_pass_rates_and_weights(arithmetic_models, problems, tmp_path):
    # Problem i passes (i mod 5) of its 4 rollouts (capped at 4); problem 23 cannot be graded.
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    passes = {content: min(i % 5, 4) for i, content in enumerate(contents)}
    reward = ScriptedReward(passes, ungradable={contents[23]})
    # 5 problems per call: the last call is padded, which must not leak into the table.
    trainer = _trainer(arithmetic_models, _config(tmp_path, pass_rate_batch_size=5, max_steps=1), problems,
                       reward_funcs=reward)
    batches = _capture_batches(trainer)
    trainer.train()

    expected = torch.tensor([min(i % 5, 4) / 4 for i in range(24)])
    table = trainer.pass_rate_table
    torch.testing.assert_close(table.pass_rates[:23], expected[:23])
    assert math.isnan(table.pass_rates[23].item())
    assert table.num_graded.tolist() == [4] * 23 + [0] and table.estimates == 1
    expected_weights = paced_weight(expected) * (torch.arange(24) != 23)
    torch.testing.assert_close(table.weights(1.0, 1.0), expected_weights)
    # The batch carries exactly these weights, and their sum over the batch.
    (batch,) = batches
    indices = [row["paced_index"] for row in batch["inputs"]]
    torch.testing.assert_close(batch["output"]["paced_weights"], expected_weights[indices])
    torch.testing.assert_close(batch["output"]["paced_weight_sum"], expected_weights[indices].sum())
    assert _logged(trainer, "paced/weight_mean")[0] == pytest.approx(expected_weights[indices].mean().item())
    assert _logged(trainer, "paced/pass_rate_share_1")[0] == pytest.approx(4 / 24)
    assert _logged(trainer, "paced/pass_rate_share_unknown")[0] == pytest.approx(1 / 24)
    assert _logged(trainer, "paced/ungradable_problems")[0] == 1


def test_gold_answers_that_are_not_mathematical_are_counted_not_graded_zero(arithmetic_models, problems, tmp_path):
    # math-verify reads "n/a" as n/a and "see solution" as a product of letters; they are ungradable, not p = 0.
    answers = list(problems["answer"][:8])
    answers[1], answers[5] = "n/a", "see solution"
    dataset = problems.select(range(8)).remove_columns("answer").add_column("answer", answers)
    trainer = _trainer(arithmetic_models, _config(tmp_path, max_steps=1, pass_rate_rollouts=2), dataset)
    trainer.train()
    table = trainer.pass_rate_table
    assert table.num_graded.tolist() == [2, 0, 2, 2, 2, 0, 2, 2]
    assert math.isnan(table.pass_rates[1].item()) and math.isnan(table.pass_rates[5].item())
    assert _logged(trainer, "paced/ungradable_problems")[0] == 2


def test_estimation_with_the_math_reward_measures_the_student(arithmetic_models, problems, tmp_path):
    trainer = _trainer(arithmetic_models, _config(tmp_path, max_steps=1), problems, reward_funcs="math")
    table = trainer.estimate_pass_rates()
    assert table.num_graded.tolist() == [4] * 24
    assert set((table.pass_rates * 4).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    # The partly competent student solves some problems, far from all.
    assert 0.0 < table.pass_rates.mean().item() < 0.6


def test_estimation_scales_to_a_dapo_sized_training_set(tiny_model_paths, tmp_path):
    # 17k problems: the estimation runs in batches with bounded memory; generation is replaced by a fixed completion so
    # the test measures the bookkeeping, not the tiny model.
    size = 17_000
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+0"}] for i in range(size)],
                              "answer": [str(i) for i in range(size)]})
    calls = []

    def every_third_passes(prompts, completions, answer, **kwargs):
        return [float(int(a) % 3 == 0) for a in answer]

    trainer = _trainer(tiny_model_paths, _config(tmp_path, pass_rate_rollouts=2, pass_rate_batch_size=1024), data,
                       reward_funcs=every_third_passes)

    def fixed_completions(prompt_ids, num_generations):
        calls.append(len(prompt_ids))
        return [[trainer._tokenizer.eos_token_id]] * (len(prompt_ids) * num_generations)

    trainer._sample_student_completions = fixed_completions
    table = trainer.estimate_pass_rates()
    assert calls == [1024] * 17  # ⌈17000 / 1024⌉ calls, each a full (padded) batch
    assert torch.equal(table.pass_rates, (torch.arange(size) % 3 == 0).float())
    assert table.num_graded.eq(2).all()


# ---- Training behaviour ----


def test_zero_weight_batches_train_nothing_and_are_logged(arithmetic_models, problems, tmp_path):
    always = ScriptedReward({prompt[-1]["content"]: 10**9 for prompt in problems["prompt"]})  # p = 1 everywhere
    trainer = _trainer(arithmetic_models, _config(tmp_path), problems, reward_funcs=always)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert _logged(trainer, "loss") == [0.0, 0.0]
    assert _logged(trainer, "grad_norm") == [0.0, 0.0]
    assert _logged(trainer, "paced/zero_weight_batches") == [1.0, 2.0]
    assert _logged(trainer, "paced/zero_weight_share") == [1.0, 1.0]
    # AdamW with zero gradients (and no weight decay) leaves every parameter as it was.
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters(), strict=True))


def test_gradient_accumulation_normalises_like_one_big_batch(arithmetic_models, problems, tmp_path):
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    trained, gradients = [], []
    for name, extra in (("one", {"per_device_train_batch_size": 8}),
                        ("two", {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})):
        reward = ScriptedReward({content: i % 5 for i, content in enumerate(contents)})
        recorder = GradientRecorder()
        trainer = _trainer(arithmetic_models, _config(tmp_path / name, max_steps=1, **extra), problems,
                           reward_funcs=reward, callbacks=[recorder])
        trainer.train()
        trained.append(trainer)
        gradients.append(recorder)
    one, two = trained
    assert _logged(one, "loss")[0] == pytest.approx(_logged(two, "loss")[0], rel=REORDERING_TOLERANCE)
    assert_same_gradients(*gradients)


def test_checkpoint_saves_the_table_and_resume_restores_it(arithmetic_models, problems, tmp_path):
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    first_reward = ScriptedReward({content: i % 5 for i, content in enumerate(contents)})
    config = _config(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    first = _trainer(arithmetic_models, config, problems, reward_funcs=first_reward)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / PASS_RATE_FILE).read_text())
    assert saved["num_problems"] == 24 and saved["estimates"] == 1

    # A resumed run restores the table instead of estimating again (this reward would give other pass rates).
    second_reward = ScriptedReward({})
    resumed = _trainer(arithmetic_models, _config(tmp_path, save_strategy="steps", save_steps=2, max_steps=3),
                       problems, reward_funcs=second_reward)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert second_reward.calls == 0 and resumed.state.global_step == 3
    assert torch.equal(resumed.pass_rate_table.pass_rates, first.pass_rate_table.pass_rates)

    # Export for inspection, as JSON and as a dataset.
    exported = resumed.export_pass_rates(str(tmp_path / "rates.json"))
    records = json.loads((tmp_path / "rates.json").read_text())
    assert len(records) == len(exported) == 24
    assert records[7]["prompt"] == problems[7]["prompt"] and records[7]["answer"] == problems[7]["answer"]
    assert records[7]["pass_rate"] == 0.5 and records[7]["weight"] == 0.25
    resumed.export_pass_rates(str(tmp_path / "rates.jsonl"))
    assert len((tmp_path / "rates.jsonl").read_text().splitlines()) == 24

    # A table estimated on other problems is refused.
    other = _trainer(arithmetic_models, _config(tmp_path / "other"), build_arithmetic_dataset()["train"].select(
        range(24, 48)), reward_funcs=second_reward)
    with pytest.raises(ValueError, match="other training prompts"):
        other.load_pass_rates(str(checkpoint / PASS_RATE_FILE))


def test_teacher_track_trains_on_reference_completions(arithmetic_models, problems, tmp_path):
    config = _config(tmp_path, rollout_source="teacher", kl_schedule="forward", teacher_completions="dataset")
    trainer = _trainer(arithmetic_models, config, problems)
    batches = _capture_batches(trainer)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    tokenizer = build_tokenizer()
    for batch in batches:
        output = batch["output"]
        for row, ids, mask in zip(batch["inputs"], output["completion_ids"], output["completion_mask"], strict=True):
            written = tokenizer.decode(ids[mask.bool()])
            assert written == row["completion"][0]["content"] + "<|im_end|>"
    assert _logged(trainer, "paced/teacher_rollouts") == [1.0, 1.0] and _logged(trainer, "paced/beta") == [0.0, 0.0]
    assert any(not torch.equal(p, q) for p, q in zip(initial, trainer.model.parameters(), strict=True))
    # Pass rates still measure the student, not the (perfect) teacher.
    assert trainer.pass_rate_table.pass_rates.mean().item() < 0.6


def test_beta_without_a_schedule_is_trls_throughout(tiny_model_paths, problems, tmp_path):
    trainer = _trainer(tiny_model_paths, _config(tmp_path, beta=0.5, max_steps=2, max_completion_length=8), problems,
                       reward_funcs=ScriptedReward({}))
    trainer.train()
    assert _logged(trainer, "paced/beta") == [0.5, 0.5] and trainer.beta == 0.5


def test_teacher_track_generates_with_the_teacher(arithmetic_models, problems, tmp_path):
    config = _config(tmp_path, rollout_source="teacher", kl_schedule="forward", max_steps=1,
                     generation_kwargs={"do_sample": False})
    trainer = _trainer(arithmetic_models, config, problems.remove_columns("completion"))
    batches = _capture_batches(trainer)
    trainer.train()
    tokenizer = build_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(arithmetic_models["teacher"])
    (batch,) = batches
    greedy = generate_completions(teacher, tokenizer, [row["prompt"] for row in batch["inputs"]], max_new_tokens=32)
    output = batch["output"]
    written = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
               for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)]
    assert written == greedy
    assert all(grade == 1.0 for grade in math_reward(written, [row["answer"] for row in batch["inputs"]]))


def test_forward_then_reverse_switches_at_the_expected_step(arithmetic_models, problems, tmp_path):
    config = _config(tmp_path, kl_schedule="forward_then_reverse", schedule_switch_fraction=0.5, max_steps=4)
    trainer = _trainer(arithmetic_models, config, problems)
    batches = _capture_batches(trainer)
    trainer.train()
    assert _logged(trainer, "paced/beta") == [0.0, 0.0, 1.0, 1.0]
    assert _logged(trainer, "paced/teacher_rollouts") == [1.0, 1.0, 0.0, 0.0]
    assert [batch["step"] for batch in batches] == [0, 1, 2, 3]
    tokenizer = build_tokenizer()
    for batch in batches:
        output = batch["output"]
        written = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                   for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)]
        references = [row["completion"][0]["content"] for row in batch["inputs"]]
        if batch["step"] < 2:
            assert written == references
        else:  # the student's own (sampled, mostly wrong) rollouts
            assert written != references
    assert trainer.beta == 1.0


def test_self_distillation_teacher_is_a_frozen_student_that_sees_the_answer(arithmetic_models, problems, tmp_path):
    config = _config(tmp_path, self_distillation=True)
    trainer = _trainer(arithmetic_models, config, problems)
    student = AutoModelForCausalLM.from_pretrained(arithmetic_models["student"])
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters(), strict=True))
    assert not any(p.requires_grad for p in teacher.parameters())
    batches = _capture_batches(trainer)
    trainer.train()
    tokenizer = build_tokenizer()
    output = batches[0]["output"]
    row = batches[0]["inputs"][0]
    teacher_prompt = tokenizer.decode(output["teacher_prompt_ids"][0], skip_special_tokens=True)
    assert f"{row['prompt'][0]['content']}\n\nThe correct final answer is {row['answer']}." in teacher_prompt
    assert output["teacher_prompt_ids"].shape[0] == output["completion_ids"].shape[0]
    losses = _logged(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and max(losses) > 0
    # The teacher stays the initial student; the student moved.
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), trainer.model.parameters(), strict=True))


def test_self_distillation_teacher_reads_the_solution_column(arithmetic_models, problems, tmp_path):
    solutions = [completion[0]["content"] for completion in problems["completion"]]
    dataset = problems.add_column("solution", solutions)
    trainer = _trainer(arithmetic_models, _config(tmp_path, self_distillation=True, max_steps=1), dataset)
    batches = _capture_batches(trainer)
    trainer.train()
    tokenizer = build_tokenizer()
    output, rows = batches[0]["output"], batches[0]["inputs"]
    for index, row in enumerate(rows):
        teacher_prompt = tokenizer.decode(output["teacher_prompt_ids"][index], skip_special_tokens=True)
        assert f"## Problem\n{row['prompt'][0]['content']}\n\n## Reference Solution\n{row['solution']}" in teacher_prompt
        assert "The correct final answer" not in teacher_prompt


def test_zero_weight_step_after_a_real_step_moves_nothing(arithmetic_models, problems, tmp_path):
    # Step 1 trains on problems of pass rate 1/2; then every pass rate is set to 1 (weight 0), so step 2's batch
    # weighs nothing. With weight decay on, AdamW would still move every parameter (momentum from step 1, and decay);
    # the step must be skipped, and the learning-rate schedule must not advance.
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    reward = ScriptedReward({content: 2 for content in contents})  # 2 of K = 4 rollouts pass: p = 0.5
    trainer = _trainer(arithmetic_models, _config(tmp_path, weight_decay=0.1, lr_scheduler_type="linear",
                                                  learning_rate=1e-2, max_steps=3), problems, reward_funcs=reward)
    snapshots = {}

    class ZeroTheWeightsAfterStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = ([p.detach().clone() for p in trainer.model.parameters()],
                                            trainer.lr_scheduler.get_last_lr()[0])
            if state.global_step == 1:
                size = len(trainer.pass_rate_table.pass_rates)
                trainer.pass_rate_table.set_estimate(torch.arange(size), torch.ones(size), torch.full((size,), 4))

    trainer.add_callback(ZeroTheWeightsAfterStepOne())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after_first, lr_first = snapshots[1]
    assert any(not torch.equal(p, q) for p, q in zip(before, after_first, strict=True))  # step 1 was real
    for step in (2, 3):
        parameters, learning_rate = snapshots[step]
        assert all(torch.equal(p, q) for p, q in zip(after_first, parameters, strict=True)), step
        assert learning_rate == lr_first, step
    assert _logged(trainer, "paced/skipped_steps")[-1] == 2.0


def test_self_distillation_teacher_prompt_changes_the_loss(arithmetic_models, problems, tmp_path):
    # Scored on the same completions, a teacher that reads the plain prompt is the student itself (zero divergence);
    # with the answer in its prompt it is not.
    trainer = _trainer(arithmetic_models, _config(tmp_path, self_distillation=True), problems)
    trainer.pass_rate_table.set_estimate(torch.arange(24), torch.full((24,), 0.5), torch.full((24,), 4))
    trainer.pass_rate_table.estimates = 1
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([problems[i] | {"paced_index": i} for i in range(8)])
    with torch.no_grad():
        privileged = trainer.compute_loss(trainer.model, inputs)
        plain = trainer.compute_loss(trainer.model, {**inputs, "teacher_prompt_ids": inputs["prompt_ids"],
                                                     "teacher_prompt_mask": inputs["prompt_mask"]})
    # KL between two float32 evaluations of one distribution: zero up to the rounding of the log-partitions, a few u
    # of the logit scale (the built-in models' logits reach ~15, so ~1e-6), far below what the privileged prompt gives.
    assert plain.item() == pytest.approx(0.0, abs=1e-5)
    assert privileged.item() > 1e-3


def test_online_mode_updates_pass_rates_from_training_rollouts(arithmetic_models, problems, tmp_path):
    estimation_rollouts = 24 * 4

    def zero_then_one(prompts, completions, **kwargs):
        zero_then_one.graded += len(completions)
        # Every estimation rollout fails; every training rollout passes.
        return [0.0 if zero_then_one.graded <= estimation_rollouts else 1.0] * len(completions)

    zero_then_one.graded = 0
    config = _config(tmp_path, pass_rate_mode="online", pass_rate_ema=0.5, max_steps=1)
    trainer = _trainer(arithmetic_models, config, problems, reward_funcs=zero_then_one)
    batches = _capture_batches(trainer)
    trainer.train()
    drawn = [row["paced_index"] for row in batches[0]["inputs"]]
    expected = torch.zeros(24)
    expected[drawn] = 0.5
    torch.testing.assert_close(trainer.pass_rate_table.pass_rates, expected)
    assert trainer.pass_rate_table.online_updates == 1
    # The batch was weighted with the table from before its own rollouts: all zero.
    assert batches[0]["output"]["paced_weights"].eq(0).all()
    assert _logged(trainer, "paced/rollout_reward_mean") == [1.0]


def test_refresh_mode_re_estimates_on_schedule(arithmetic_models, problems, tmp_path):
    reward = ScriptedReward({})
    config = _config(tmp_path, pass_rate_mode="refresh", pass_rate_refresh_steps=2, max_steps=4)
    trainer = _trainer(arithmetic_models, config, problems, reward_funcs=reward)
    trainer.train()
    # At the start and after step 2 (not after the last step): 2 × 24 problems × 4 rollouts graded.
    assert trainer.pass_rate_table.estimates == 2 and trainer.pass_rate_table.estimated_at_step == 2
    assert sum(reward.seen.values()) == 2 * 24 * 4
    assert _logged(trainer, "paced/pass_rate_estimates") == [1.0, 1.0, 2.0, 2.0]


# ---- The example script ----


def _run_example(*args, timeout=600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, str(root / "examples" / "paced_distill.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=root)


def test_example_help_lists_paced_flags():
    result = _run_example("--help")
    assert result.returncode == 0, result.stderr
    flags = ("--paced_alpha", "--paced_beta", "--pass_rate_rollouts", "--pass_rate_mode", "--pass_rate_refresh_steps",
             "--rollout_source", "--teacher_completions", "--kl_schedule", "--schedule_switch_fraction",
             "--self_distillation", "--reward_funcs", "--num_train_problems", "--teacher_model_name_or_path",
             "--model_name_or_path", "--dataset_name", "--token_selection")
    for flag in flags:
        assert flag in result.stdout, flag


@pytest.mark.slow
def test_example_runs_on_the_builtin_task(arithmetic_models, tmp_path):
    output_dir = tmp_path / "out"
    result = _run_example("--max_steps", "10", "--num_train_problems", "96", "--num_eval_problems", "50",
                          "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("Student pass rates (8 rollouts per problem, once)", "weights p^1(1-p)^1: mean",
                 "student accuracy before:", "student accuracy after:"):
        assert line in result.stdout, line
    assert (output_dir / "model.safetensors").exists()
    assert json.loads((output_dir / PASS_RATE_FILE).read_text())["num_problems"] == 96
    assert len((output_dir / "pass_rates.jsonl").read_text().splitlines()) == 96


def test_example_prepares_real_datasets():
    import sys
    from pathlib import Path

    from datasets import DatasetDict

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import paced_distill
    finally:
        sys.path.pop(0)
    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["1+1?", "2+2?"], "solution": ["2", "4"]})})
    ready = paced_distill.as_chat_prompts(data, "solution")
    assert ready["train"][0]["prompt"] == [{"role": "user", "content": "1+1?"}]
    assert ready["train"]["answer"] == ["2", "4"]
    with pytest.raises(ValueError, match="not a column"):
        paced_distill.as_chat_prompts(data, "gold")


# ---- Weighted sampling (paced_sampling="sample") ----


def _table(rates):
    table = PassRateTable(len(rates))
    table.pass_rates = torch.tensor(rates, dtype=torch.float32)
    table.estimates = 1
    return table


def test_sampler_draws_in_proportion_to_the_weight_and_never_weight_zero():
    # Weights p(1-p): 0, 3/16, 1/4, 3/16, 0, and 0 for the unknown p.
    table = _table([0.0, 0.25, 0.5, 0.75, 1.0, math.nan])
    expected = torch.tensor([0.0, 0.1875, 0.25, 0.1875, 0.0, 0.0], dtype=torch.float64) / 0.625
    torch.testing.assert_close(sampling_probabilities(table.weights(1.0, 1.0)), expected)
    sampler = ProblemSampler(table, 1.0, 1.0, seed=0)
    draws = 200_000
    counts = torch.bincount(sampler.draw(step=3, num_draws=draws), minlength=6).double()
    assert counts[[0, 4, 5]].sum() == 0
    # Multinomial counts: within 5 standard deviations of n p for every problem.
    std = (draws * expected * (1 - expected)).sqrt()
    assert ((counts - draws * expected).abs() <= 5 * std).all()
    # A draw depends on (seed, step) only; each process takes a disjoint slice of the same global draw.
    assert torch.equal(sampler.draw(7, 12), sampler.draw(7, 12))
    assert not torch.equal(sampler.draw(7, 12), sampler.draw(8, 12))
    shares = [sampler.draw_share(7, 4, num_processes=3, rank=rank) for rank in range(3)]
    assert torch.equal(torch.cat(shares), sampler.draw(7, 12))
    # The sampler reads the table at every draw.
    table.pass_rates[1] = 1.0
    assert not sampler.draw(3, 1000).eq(1).any()
    table.pass_rates[:] = torch.tensor([0.0, 1.0, 0.0, 1.0, math.nan, 0.0])
    with pytest.raises(ValueError, match="all 6 training problems weigh 0"):
        sampler.draw(3, 8)
    with pytest.raises(ValueError, match="paced_sampling must be one of weight, sample"):
        PacedConfig("out", paced_sampling="importance", bf16=False)


def _problem_of_prompt(trainer, dataset):
    prompt_ids = trainer._tokenize_prompts(list(dataset["prompt"]))[0]
    return {tuple(ids): index for index, ids in enumerate(prompt_ids)}


def test_sample_mode_generates_for_weighted_problems_only_and_takes_the_plain_mean(arithmetic_models, problems,
                                                                                   tmp_path):
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    # p = (i mod 5) / 4: problems with i mod 5 in {0, 4} weigh 0, and problem 23 cannot be graded.
    reward = ScriptedReward({content: i % 5 for i, content in enumerate(contents)}, ungradable={contents[23]})
    trainer = _trainer(arithmetic_models, _config(tmp_path, paced_sampling="sample"), problems, reward_funcs=reward)
    student = copy.deepcopy(trainer.model).double()
    teacher = copy.deepcopy(trainer.teacher_model).double()
    batches = _capture_batches(trainer)
    generated, losses = [], []
    generate, compute_loss = trainer._generate_single_turn, trainer.compute_loss

    def recording_generate(prompt_ids, *args, **kwargs):
        generated.extend(map(tuple, prompt_ids))
        return generate(prompt_ids, *args, **kwargs)

    def recording_loss(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.detach().double())
        return loss

    trainer._generate_single_turn, trainer.compute_loss = recording_generate, recording_loss
    trainer.train()

    weights = trainer.pass_rate_table.weights(1.0, 1.0)
    problem_of = _problem_of_prompt(trainer, problems)
    reached = [problem_of[ids] for ids in generated]
    assert len(reached) == 2 * 8 and all(weights[index] > 0 for index in reached)
    assert _logged(trainer, "paced/training_rollouts") == [8.0, 16.0]
    assert _logged(trainer, "paced/zero_weight_share") == [0.0, 0.0]

    # Step 0's loss against a float64 reference of the sampled objective: the plain mean over the drawn rollouts of
    # each one's token-mean reverse KL, from the models as they were before the update.
    output = batches[0]["output"]
    assert torch.equal(output["paced_weights"], torch.ones(8)) and output["paced_weight_sum"].item() == 8
    sequence = [output[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    per_token = reference.reverse_kl(reference.completion_logits(student, *sequence),
                                     reference.completion_logits(teacher, *sequence))
    expected = reference.rollout_mean_loss(per_token, output["completion_mask"])
    torch.testing.assert_close(losses[0], expected, rtol=1e-4, atol=1e-6 * expected.abs().item())


def test_sample_mode_follows_a_refreshed_table_and_stops_when_nothing_weighs(arithmetic_models, problems, tmp_path):
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    index_of = {content: i for i, content in enumerate(contents)}
    seen = {}

    def halves(prompts, completions, **kwargs):
        # First estimation: problems 0-11 pass 2 of 4 rollouts, the others none; the second: the other way round.
        rewards = []
        for prompt in prompts:
            i, count = index_of[prompt[-1]["content"]], seen.get(prompt[-1]["content"], 0)
            seen[prompt[-1]["content"]] = count + 1
            rewards.append(float((count < 2 and i < 12) or (4 <= count < 6 and i >= 12)))
        return rewards

    config = _config(tmp_path, paced_sampling="sample", pass_rate_mode="refresh", pass_rate_refresh_steps=2,
                     max_steps=4)
    trainer = _trainer(arithmetic_models, config, problems, reward_funcs=halves)
    batches = _capture_batches(trainer)
    trainer.train()
    drawn = [[row["paced_index"] for row in batch["inputs"]] for batch in batches]
    assert all(i < 12 for step in drawn[:2] for i in step) and all(i >= 12 for step in drawn[2:] for i in step)

    # After a refresh in which every rollout fails, no problem weighs anything: a clear error, not an endless loop.
    failing = _trainer(arithmetic_models, config, problems, reward_funcs=ScriptedReward({content: 2 for content in
                                                                                          contents}))
    with pytest.raises(ValueError, match="all 24 training problems weigh 0"):
        failing.train()
    assert failing.state.global_step == 2


def test_sample_mode_resumes_with_the_draws_of_the_uninterrupted_run(arithmetic_models, problems, tmp_path):
    contents = [prompt[-1]["content"] for prompt in problems["prompt"]]
    passes = {content: i % 5 for i, content in enumerate(contents)}
    drawn = {}
    for name, resume in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoint-1")):
        config = _config(tmp_path / name, paced_sampling="sample", max_steps=2, save_strategy="steps", save_steps=1)
        trainer = _trainer(arithmetic_models, config, problems, reward_funcs=ScriptedReward(passes))
        batches = _capture_batches(trainer)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        drawn[name] = {batch["step"]: [row["paced_index"] for row in batch["inputs"]] for batch in batches}
    assert set(drawn["resumed"]) == {1}
    assert drawn["resumed"][1] == drawn["straight"][1] != drawn["straight"][0]
