import math
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_tip import ACEGRPOConfig, ACEGRPOTrainer, ace_confidence_shift, ace_scale_advantages
from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair, tiny_model
from trl_tip.weighting import ace_scale_factors
import reference
from builders import training_config
from numerics import assert_reordered_close


# ---------------------------------------------------------------------------------------------------------------------
# The pure functions, against hand-computed values


def test_scale_advantages_softplus_hand_computed():
    advantages = torch.tensor([1.0, -1.0, -0.5, 0.0, -2.0])
    shifts = torch.tensor([0.3, 0.0, 2.0, -1.0, -3.0])
    # softplus(0) = ln 2, softplus(2) = ln(1 + e^2) = 2.126928, softplus(-3) = ln(1 + e^-3) = 0.048587
    expected = torch.tensor([1.0, -(1 + math.log(2)), -0.5 * (1 + 2.126928011), 0.0, -2.0 * (1 + 0.048587352)])
    torch.testing.assert_close(ace_scale_advantages(advantages, shifts), expected)
    # alpha scales the penalty linearly: 1 + 0.5 * ln 2
    scaled = ace_scale_advantages(advantages, shifts, alpha=0.5)
    torch.testing.assert_close(scaled[1], torch.tensor(-(1 + 0.5 * math.log(2))))


def test_scale_advantages_relu_hand_computed():
    advantages = torch.tensor([1.0, -1.0, -0.5, 0.0, -2.0])
    shifts = torch.tensor([0.3, 0.0, 2.0, -1.0, -3.0])
    # relu: only wrong rollouts whose confidence grew are scaled; -0.5 * (1 + 0.5 * 2) = -1.0
    expected = torch.tensor([1.0, -1.0, -1.0, 0.0, -2.0])
    torch.testing.assert_close(ace_scale_advantages(advantages, shifts, alpha=0.5, transform="relu"), expected)


def test_scale_advantages_per_token_advantages():
    advantages = torch.tensor([[-1.0, 2.0, -3.0], [0.5, -0.5, 0.0]])
    shifts = torch.tensor([1.0, -2.0])
    expected = torch.tensor([[-2.0, 2.0, -6.0], [0.5, -0.5, 0.0]])  # relu: factors 2 and 1 per row
    torch.testing.assert_close(ace_scale_advantages(advantages, shifts, transform="relu"), expected)


def test_positive_advantages_never_change_and_alpha_zero_is_identity():
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(1000, generator=generator)
    shifts = 5 * torch.randn(1000, generator=generator)
    shifts[:3] = torch.tensor([float("inf"), 80.0, -80.0])
    for transform in ("softplus", "relu"):
        assert torch.equal(ace_scale_advantages(advantages, shifts, alpha=0.0, transform=transform), advantages)
        scaled = ace_scale_advantages(advantages[3:], shifts[3:], alpha=3.0, transform=transform)
        non_negative = advantages[3:] >= 0
        assert torch.equal(scaled[non_negative], advantages[3:][non_negative])
        assert (scaled[~non_negative] <= advantages[3:][~non_negative]).all()
    # softplus scales every wrong rollout strictly
    scaled = ace_scale_advantages(advantages[3:], shifts[3:], alpha=3.0)
    assert (scaled[advantages[3:] < 0] < advantages[3:][advantages[3:] < 0]).all()


def test_scale_factors():
    torch.testing.assert_close(
        ace_scale_factors(torch.tensor([0.0, 1.0, -1.0]), alpha=2.0, transform="relu"), torch.tensor([1.0, 3.0, 1.0])
    )
    torch.testing.assert_close(ace_scale_factors(torch.tensor([0.0]), alpha=1.0), torch.tensor([1 + math.log(2)]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -0.1}, "alpha must be >= 0"),
        ({"alpha": float("nan")}, "alpha must be >= 0"),
        ({"transform": "tanh"}, "transform must be one of"),
    ],
)
def test_scale_advantages_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ace_scale_advantages(torch.tensor([-1.0]), torch.tensor([0.0]), **kwargs)


def test_scale_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one confidence shift per rollout"):
        ace_scale_advantages(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="one confidence shift per rollout"):
        ace_scale_advantages(torch.zeros(3, 3), torch.zeros(3, 3))


def test_confidence_shift_hand_computed():
    policy = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -3.0, float("-inf")], [-1.0, -2.0, -0.5], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # The default is the sequence-level log-ratio, the sum: row 0: 0.5 + 1.0, the masked -inf ignored;
    # row 1: 0.5 + 1.5 + 0; row 2: no tokens -> 0
    torch.testing.assert_close(ace_confidence_shift(policy, reference, mask), torch.tensor([1.5, 2.0, 0.0]))
    torch.testing.assert_close(
        ace_confidence_shift(policy, reference, mask, reduction="mean"), torch.tensor([0.75, 2 / 3, 0.0])
    )


def test_sum_and_mean_confidence_give_the_hand_computed_factors():
    # A wrong rollout of 20 tokens, each 0.5 nats more likely under the policy than under the reference: the
    # sequence-level shift is 10, softplus(10) = 10.0000454, so its advantage is scaled by ~11; the per-token mean
    # is 0.5, softplus(0.5) = 0.974077, a factor of ~1.97. A second wrong rollout the policy grew less sure of
    # (−0.25 per token over 8 tokens: sum −2, mean −0.25) and a correct one that stays untouched.
    policy = torch.zeros(3, 20)
    reference = torch.zeros(3, 20)
    reference[0] = -0.5
    policy[1, :8] = -0.25
    mask = torch.zeros(3, 20)
    mask[0] = 1
    mask[1, :8] = 1
    mask[2, :5] = 1
    advantages = torch.tensor([-1.0, -0.5, 1.5])
    softplus = lambda c: math.log1p(math.exp(c))  # noqa: E731
    by_sum = ace_scale_advantages(advantages, ace_confidence_shift(policy, reference, mask, "sum"))
    by_mean = ace_scale_advantages(advantages, ace_confidence_shift(policy, reference, mask, "mean"))
    torch.testing.assert_close(by_sum, torch.tensor([-(1 + softplus(10.0)), -0.5 * (1 + softplus(-2.0)), 1.5]))
    torch.testing.assert_close(by_mean, torch.tensor([-(1 + softplus(0.5)), -0.5 * (1 + softplus(-0.25)), 1.5]))


def test_max_factor_bounds_the_scale():
    shifts = torch.tensor([30.0, 0.0, -5.0])
    torch.testing.assert_close(
        ace_scale_factors(shifts, alpha=1.0, max_factor=4.0), torch.tensor([4.0, 1 + math.log(2), 1 + math.log1p(math.exp(-5.0))])
    )
    scaled = ace_scale_advantages(torch.tensor([-2.0, 1.0, -1.0]), shifts, alpha=1.0, max_factor=4.0)
    torch.testing.assert_close(scaled, torch.tensor([-8.0, 1.0, -(1 + math.log1p(math.exp(-5.0)))]))
    with pytest.raises(ValueError, match="max_factor must be None or >= 1"):
        ace_scale_factors(shifts, max_factor=0.5)


def test_non_finite_scaled_advantage_raises():
    # An infinite shift on a wrong rollout would give an infinite advantage; a bound makes it finite again.
    shifts = torch.tensor([float("inf"), 0.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        ace_scale_advantages(torch.tensor([-1.0, 1.0]), shifts)
    torch.testing.assert_close(
        ace_scale_advantages(torch.tensor([-1.0, 1.0]), shifts, max_factor=10.0), torch.tensor([-10.0, 1.0])
    )
    # On a correct rollout the shift is never used.
    assert torch.equal(ace_scale_advantages(torch.tensor([1.0, 1.0]), shifts), torch.tensor([1.0, 1.0]))


def test_confidence_shift_is_detached():
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    shift = ace_confidence_shift(policy, torch.zeros(1, 2), torch.ones(1, 2))
    assert not shift.requires_grad


def test_confidence_shift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction must be one of"):
        ace_confidence_shift(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), reduction="max")
    with pytest.raises(ValueError, match="same"):
        ace_confidence_shift(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ace_alpha", -1.0, "ace_alpha must be a number >= 0"),
        ("ace_transform", "tanh", "ace_transform must be one of"),
        ("ace_confidence", "max", "ace_confidence must be one of"),
        ("ace_max_factor", 0.5, "ace_max_factor must be None"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        ACEGRPOConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_config_defaults(tmp_path):
    args = ACEGRPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.ace_alpha, args.ace_transform, args.ace_confidence) == (1.0, "softplus", "sum")
    assert args.ace_max_factor is None
    assert args.beta == 0.0  # TRL's default, kept


# ---------------------------------------------------------------------------------------------------------------------
# Trainer, on a tiny random model with a reward that varies within every group


def diversity_reward(completions, **kwargs):
    # Deterministic and different across a group's samples, so every group has advantages of both signs.
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


NUM_PROBLEMS = 32


# TRL's own config pins memory, which torch warns about without an accelerator; trl_tip's do not there.
_config = partial(training_config, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  max_steps=3, learning_rate=1e-2, dataloader_pin_memory=False)


def completion_logps(model, batch):
    """Plain per-token log-probabilities of the completion tokens (temperature 1): log_softmax, no fused head."""
    completion_ids = batch["completion_ids"]
    logits = reference.completion_logits(model, batch["prompt_ids"], batch["prompt_mask"], completion_ids,
                                         batch["completion_mask"])
    return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def dropout_model_path(tmp_path_factory):
    """The tiny student with attention dropout on: every training-mode forward draws random numbers."""
    tokenizer = build_tokenizer()
    model = tiny_model("student", tokenizer=tokenizer, attention_dropout=0.1)
    return save_pretrained_pair(model, tokenizer, tmp_path_factory.mktemp("dropout") / "student")


@pytest.mark.parametrize("loss_type, dropout", [("dapo", False), ("grpo", True)], ids=["dapo", "grpo-dropout"])
def test_alpha_zero_reproduces_grpo_exactly(
    tiny_model_paths, dropout_model_path, problems, tmp_path, loss_type, dropout
):
    # With dropout, an extra forward pass that advanced the random state would change every later sample.
    model_path = dropout_model_path if dropout else tiny_model_paths["student"]
    grpo = GRPOTrainer(
        model=model_path,
        reward_funcs=diversity_reward,
        args=_config(GRPOConfig, tmp_path / "grpo", loss_type=loss_type),
        train_dataset=problems,
    )
    grpo.train()
    ace = ACEGRPOTrainer(
        model=model_path,
        reward_funcs=diversity_reward,
        args=_config(ACEGRPOConfig, tmp_path / "ace", ace_alpha=0.0, loss_type=loss_type),
        train_dataset=problems,
    )
    ace.train()

    assert len(losses(ace)) == 3
    assert losses(ace) == losses(grpo)
    initial = AutoModelForCausalLM.from_pretrained(model_path)
    for (name, ace_param), grpo_param in zip(ace.model.named_parameters(), grpo.model.parameters(), strict=True):
        assert torch.equal(ace_param, grpo_param), name
    assert any(not torch.equal(p, q) for p, q in zip(ace.model.parameters(), initial.parameters(), strict=True))
    # The confidence shift was measured all the same: non-zero once the policy has moved (and, without dropout,
    # exactly zero before the first update, when the policy is the reference).
    shifts = [entry["ace/confidence_shift_mean"] for entry in ace.state.log_history if "loss" in entry]
    assert shifts[2] != 0.0
    assert dropout or shifts[0] == 0.0
    assert all(entry["ace/scaled_fraction"] == 0.0 for entry in ace.state.log_history if "loss" in entry)


def _moved_pair(tiny_model_paths, problems, tmp_path, **ace_overrides):
    """GRPO and ACE (α = 2) on the same policy, moved away from the reference identically."""
    grpo = GRPOTrainer(
        model=tiny_model_paths["student"],
        reward_funcs=diversity_reward,
        args=_config(GRPOConfig, tmp_path / "grpo", **ace_overrides),
        train_dataset=problems,
    )
    ace = ACEGRPOTrainer(
        model=tiny_model_paths["student"],
        reward_funcs=diversity_reward,
        args=_config(ACEGRPOConfig, tmp_path / "ace", ace_alpha=2.0, **ace_overrides),
        train_dataset=problems,
    )
    # Move both policies away from the reference identically, so that confidence shifts are not all zero.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for ace_param, grpo_param in zip(ace.model.parameters(), grpo.model.parameters(), strict=True):
            noise = 0.05 * torch.randn(ace_param.shape, generator=generator)
            ace_param.add_(noise)
            grpo_param.add_(noise)
    inputs = [problems[i // 4] for i in range(8)]  # two groups of four
    torch.manual_seed(0)
    grpo_batch = grpo._generate_and_score_completions([dict(x) for x in inputs])
    torch.manual_seed(0)
    ace_batch = ace._generate_and_score_completions([dict(x) for x in inputs])
    assert torch.equal(ace_batch["completion_ids"], grpo_batch["completion_ids"])
    return ace, ace_batch, grpo_batch


def _expected_ace_advantages(ace, ace_batch, advantages, model_path):
    mask = ace_batch["completion_mask"]
    reference_model = AutoModelForCausalLM.from_pretrained(model_path)
    shifts = ace_confidence_shift(completion_logps(ace.model, ace_batch), completion_logps(reference_model, ace_batch),
                                  mask)
    assert shifts.abs().max() > 1e-3
    return ace_scale_advantages(advantages, shifts, alpha=2.0)


def test_negative_advantages_scaled_positive_untouched(tiny_model_paths, problems, tmp_path):
    """
    ACE's advantages equal ace_scale_advantages(GRPO's advantages, c), c measured against the reference. With one
    iteration and generation aligned with the optimiser step (TRL computes no `old_per_token_logps`), the scaling
    happens in the loss, from the log-probabilities the loss computes anyway.
    """
    ace, ace_batch, grpo_batch = _moved_pair(tiny_model_paths, problems, tmp_path)
    before = grpo_batch["advantages"]
    assert (before > 0).any() and (before < 0).any()
    # Not scaled yet: the batch carries the reference log-probabilities and the mark of a scaling in the loss.
    assert torch.equal(ace_batch["advantages"], before)
    assert "ref_per_token_logps" not in ace_batch  # beta = 0: TRL's KL term sees nothing
    expected = _expected_ace_advantages(ace, ace_batch, before, tiny_model_paths["student"])

    loss = ace._compute_loss(ace.model, ace_batch)
    after = ace_batch["advantages"]
    assert torch.isfinite(loss)
    assert torch.equal(after[before >= 0], before[before >= 0])
    assert (after[before < 0] < before[before < 0]).all()
    # The shifts here and in the trainer are two float32 evaluations of the same log-probability sums.
    assert_reordered_close(after, expected)
    # Scaled once: the mark is consumed, so a second loss pass on the same micro-batch does not scale again.
    ace._compute_loss(ace.model, ace_batch)
    assert torch.equal(ace_batch["advantages"], after)


def test_advantages_scaled_at_generation_when_trl_keeps_the_sampling_policy(tiny_model_paths, problems, tmp_path):
    # A generation batch spanning two optimiser steps: the weights move between generation and the second half's
    # loss, so TRL computes `old_per_token_logps` at generation, and ACE scales there, from those.
    ace, ace_batch, grpo_batch = _moved_pair(
        tiny_model_paths, problems, tmp_path, per_device_train_batch_size=4, steps_per_generation=2
    )
    assert ace_batch.get("old_per_token_logps") is not None
    before, after = grpo_batch["advantages"], ace_batch["advantages"]
    assert (before < 0).any()
    assert torch.equal(after[before >= 0], before[before >= 0])
    assert_reordered_close(after, _expected_ace_advantages(ace, ace_batch, before, tiny_model_paths["student"]))


def _policy_and_reference_forwards(trainer):
    counts = {"policy": 0, "reference": 0}
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.register_forward_hook(lambda *_: counts.__setitem__("policy", counts["policy"] + 1))
    if trainer.ref_model is not None:
        trainer.ref_model.register_forward_hook(lambda *_: counts.__setitem__("reference", counts["reference"] + 1))
    return counts


def test_ace_costs_the_forward_passes_of_grpo_with_a_reference(tiny_model_paths, problems, tmp_path):
    # GRPO with a KL penalty (beta > 0) scores the completions under the reference once per generation batch; ACE at
    # beta = 0 needs exactly that reference pass and no policy pass besides the loss's own.
    runs = {}
    for name, trainer_class, config_class, overrides in (
        ("grpo_reference", GRPOTrainer, GRPOConfig, {"beta": 0.04}),
        ("ace", ACEGRPOTrainer, ACEGRPOConfig, {}),
    ):
        trainer = trainer_class(
            model=tiny_model_paths["student"],
            reward_funcs=diversity_reward,
            args=_config(config_class, tmp_path / name, max_steps=2, **overrides),
            train_dataset=problems,
        )
        counts = _policy_and_reference_forwards(trainer)
        trainer.train()
        runs[name] = counts
    # Generation itself calls the policy's forward once per generated token in both; the counts must agree exactly.
    assert runs["ace"] == runs["grpo_reference"]
    assert runs["ace"]["reference"] == 2


def test_full_model_reference_with_beta_zero(tiny_model_paths, problems, tmp_path):
    trainer = ACEGRPOTrainer(
        model=tiny_model_paths["student"],
        reward_funcs=diversity_reward,
        args=_config(ACEGRPOConfig, tmp_path, max_steps=2),
        train_dataset=problems,
    )
    assert trainer.beta == 0.0 and trainer.args.beta == 0.0
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not trainer.ref_model.training
    trainer.train()

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"])
    for reference_param, initial_param in zip(trainer.ref_model.parameters(), initial.parameters(), strict=True):
        assert torch.equal(reference_param, initial_param)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial.parameters(), strict=True))

    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([dict(problems[i // 4]) for i in range(4)])
    reference_logps = trainer._reference_completion_logps(batch, "train")
    mask = batch["completion_mask"].bool()
    assert_reordered_close(reference_logps[mask], completion_logps(initial, batch)[mask])
    policy_logps = trainer._completion_logps(trainer.model, batch, "train")
    assert (policy_logps - reference_logps)[mask].abs().max() > 1e-3
    assert trainer.state.log_history[1]["ace/confidence_shift_max"] > trainer.state.log_history[1][
        "ace/confidence_shift_min"
    ]


def test_lora_reference_is_the_adapter_disabled_model(tiny_model_paths, problems, tmp_path):
    from peft import LoraConfig

    trainer = ACEGRPOTrainer(
        model=tiny_model_paths["student"],
        reward_funcs=diversity_reward,
        args=_config(ACEGRPOConfig, tmp_path, max_steps=2, learning_rate=5e-2),
        train_dataset=problems,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.ref_model is None and trainer.beta == 0.0
    assert "ref" not in trainer.model.peft_config  # a new adapter: disabling it gives the initial model
    trainer.train()

    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([dict(problems[i // 4]) for i in range(4)])
    mask = batch["completion_mask"].bool()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"])
    reference_logps = trainer._reference_completion_logps(batch, "train")
    assert_reordered_close(reference_logps[mask], completion_logps(base, batch)[mask])
    policy_logps = trainer._completion_logps(trainer.model, batch, "train")
    assert (policy_logps - reference_logps)[mask].abs().max() > 1e-4  # the adapter has moved
    assert any(entry.get("ace/confidence_shift_max", 0.0) != 0.0 for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "dr_grpo", "ace_transform": "relu", "ace_confidence": "mean"},
        {"loss_type": "bnpo", "beta": 0.04, "ace_max_factor": 1.5},
    ],
    ids=["dr_grpo-relu-mean", "bnpo-kl-bounded"],
)
def test_trains_with_other_loss_types(tiny_model_paths, problems, tmp_path, overrides):
    trainer = ACEGRPOTrainer(
        model=tiny_model_paths["student"],
        reward_funcs=diversity_reward,
        args=_config(ACEGRPOConfig, tmp_path, max_steps=2, **overrides),
        train_dataset=problems,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    for name in ("mean", "min", "p10", "p50", "p90", "max"):
        assert all(math.isfinite(entry[f"ace/confidence_shift_{name}"]) for entry in logged)
        assert all(entry["ace/confidence_shift_min"] <= entry[f"ace/confidence_shift_{name}"] for entry in logged)
        assert all(entry[f"ace/confidence_shift_{name}"] <= entry["ace/confidence_shift_max"] for entry in logged)
    assert all(math.isfinite(entry["ace/scaled_fraction"]) for entry in logged)
    assert any(entry["ace/scaled_fraction"] > 0 for entry in logged)
    bound = overrides.get("ace_max_factor", math.inf)
    for name in ("mean", "p50", "p90", "max"):
        assert all(1.0 <= entry[f"ace/scale_factor_{name}"] <= bound for entry in logged if f"ace/scale_factor_{name}" in entry)
    if overrides.get("beta"):
        assert all("kl" in entry for entry in logged)


def test_rejects_plain_grpo_config(tiny_model_paths, tmp_path):
    with pytest.raises(TypeError, match="needs an ACEGRPOConfig"):
        ACEGRPOTrainer(
            model=tiny_model_paths["student"], reward_funcs=diversity_reward, args=_config(GRPOConfig, tmp_path)
        )


def test_rejects_model_instance_without_path(problems, tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        ACEGRPOTrainer(
            model=tiny_model("student"),
            reward_funcs=diversity_reward,
            args=_config(ACEGRPOConfig, tmp_path),
            train_dataset=problems,
        )


@pytest.mark.slow
def test_example_runs_on_the_builtin_task(arithmetic_models, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "examples/ace_grpo.py", "--max_steps", "2", "--per_device_train_batch_size", "16"]
    command += ["--num_eval_problems", "8", "--num_eval_samples", "4", "--output_dir", str(tmp_path / "ace")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "pass@4" in completed.stdout and "ACE-GRPO" in completed.stdout
    results = json.loads((tmp_path / "ace" / "pass_at_k.json").read_text())
    assert set(results) == {"before", "GRPO", "ACE-GRPO"}
    assert all(set(result["pass_at_k"]) == {"1", "2", "3", "4"} for result in results.values())
    assert (tmp_path / "ace" / "model.safetensors").exists()
