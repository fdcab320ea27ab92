"""Bad inputs fail at construction, with a message naming the field, before any model generates anything."""

import warnings
from functools import partial

import pytest
import torch
from datasets import Dataset

from trl_tip import (
    ACEGRPOConfig,
    ACEGRPOTrainer,
    OPSDCConfig,
    OPSDCTrainer,
    PacedConfig,
    PacedTrainer,
    TipDistillConfig,
    TipDistillTrainer,
    math_reward,
)
from trl_tip.tiny_models import build_tokenizer
from builders import training_config


_config = partial(training_config, max_steps=1, per_device_train_batch_size=4, max_completion_length=8)
PROMPTS = [[{"role": "user", "content": f"{a}+{a + 1}"}] for a in range(8)]


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


def _build(trainer, paths, tmp_path, train_dataset, eval_dataset=None, reward_funcs=_reward, **config):
    """Construct one of the four trainers on the tiny models, with `config` overriding the defaults above."""
    if trainer == "tip":
        return TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"],
                                 args=_config(TipDistillConfig, tmp_path, **config), train_dataset=train_dataset,
                                 eval_dataset=eval_dataset)
    if trainer == "paced":
        return PacedTrainer(model=paths["student"], teacher_model=paths["teacher"],
                            args=_config(PacedConfig, tmp_path, **config), train_dataset=train_dataset,
                            eval_dataset=eval_dataset, reward_funcs=reward_funcs)
    if trainer == "opsdc":
        return OPSDCTrainer(paths["student"], args=_config(OPSDCConfig, tmp_path, **config),
                            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=build_tokenizer(),
                            reward_funcs=reward_funcs)
    return ACEGRPOTrainer(model=paths["student"], reward_funcs=reward_funcs,
                          args=_config(ACEGRPOConfig, tmp_path, num_generations=4, **config),
                          train_dataset=train_dataset, eval_dataset=eval_dataset)


TRAINERS = ["tip", "paced", "opsdc", "ace"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_missing_prompt_column_in_train_or_eval_dataset(tiny_model_paths, tmp_path, trainer):
    good = Dataset.from_dict({"prompt": PROMPTS, "answer": ["1"] * len(PROMPTS)})
    bad = Dataset.from_dict({"question": PROMPTS, "answer": ["1"] * len(PROMPTS)})
    with pytest.raises(ValueError, match=r"`train_dataset` has columns \['question', 'answer'\] but no `prompt`"):
        _build(trainer, tiny_model_paths, tmp_path, bad)
    with pytest.raises(ValueError, match=r"`eval_dataset\['held_out'\]` has columns .* but no `prompt`"):
        _build(trainer, tiny_model_paths, tmp_path, good, eval_dataset={"held_out": bad})


@pytest.mark.parametrize("trainer", TRAINERS)
def test_empty_plain_prompt(tiny_model_paths, tmp_path, trainer):
    prompts = ["1+1=", "2+2=", "  ", "3+3="]
    dataset = Dataset.from_dict({"prompt": prompts, "answer": ["2", "4", "0", "6"]})
    with pytest.raises(ValueError, match="`train_dataset` row 2 has an empty `prompt`"):
        _build(trainer, tiny_model_paths, tmp_path, dataset)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_an_empty_training_set_is_refused(tiny_model_paths, tmp_path, trainer):
    # TRL would train for zero steps and report success.
    empty = Dataset.from_dict({"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="`train_dataset` has no rows, so there is nothing to train on"):
        _build(trainer, tiny_model_paths, tmp_path, empty)


@pytest.mark.parametrize("trainer", ["paced", "opsdc", "ace"])
def test_the_math_reward_needs_an_answer_column_where_it_grades(tiny_model_paths, tmp_path, trainer):
    # Checked at construction, not after the first rollouts were generated.
    answered = Dataset.from_dict({"prompt": PROMPTS, "answer": ["1"] * len(PROMPTS)})
    unanswered = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match=r"`train_dataset` has columns \['prompt'\] but no `answer` column"):
        _build(trainer, tiny_model_paths, tmp_path, unanswered, reward_funcs=math_reward)
    if trainer == "paced":
        # PACED grades training problems only: its evaluation is the unweighted divergence.
        _build(trainer, tiny_model_paths, tmp_path, answered, eval_dataset=unanswered, reward_funcs=math_reward)
        return
    with pytest.raises(ValueError, match=r"`eval_dataset\['held_out'\]` has columns .* but no `answer` column"):
        _build(trainer, tiny_model_paths, tmp_path, answered, eval_dataset={"held_out": unanswered},
               reward_funcs=math_reward)
    # Other reward functions read what they like: nothing is required of them.
    _build(trainer, tiny_model_paths, tmp_path, unanswered, eval_dataset=unanswered)


@pytest.mark.parametrize("config_class", [TipDistillConfig, PacedConfig, OPSDCConfig, ACEGRPOConfig])
def test_configs_pin_memory_only_for_an_accelerator(config_class, monkeypatch):
    # Pinned host memory only speeds copies to a device; without one torch warns on every dataloader built.
    assert not torch.accelerator.is_available()  # this suite runs on CPU
    assert config_class(bf16=False).dataloader_pin_memory is False
    monkeypatch.setattr("trl_tip.trainers._inputs.accelerator_available", lambda: True)
    assert config_class(bf16=False).dataloader_pin_memory is True
    assert config_class(bf16=False, dataloader_pin_memory=False).dataloader_pin_memory is False


def test_a_trainers_dataloaders_do_not_warn_about_pinned_memory(tiny_model_paths, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "answer": ["1"] * len(PROMPTS)})
    trainer = _build("tip", tiny_model_paths, tmp_path, dataset, eval_dataset=dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
        next(iter(trainer.get_eval_dataloader()))
    assert [str(warning.message) for warning in caught if "pin" in str(warning.message)] == []


@pytest.mark.parametrize("config_class", [TipDistillConfig, PacedConfig, OPSDCConfig, ACEGRPOConfig])
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_non_positive_temperature_is_a_config_error(config_class, temperature):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        config_class(temperature=temperature, bf16=False)


def test_greedy_rollouts_are_refused_where_they_cannot_train():
    # GRPO's group of rollouts would all be one completion: every advantage zero.
    with pytest.raises(ValueError, match="do_sample=False.*group-normalised advantage is zero"):
        ACEGRPOConfig(generation_kwargs={"do_sample": False}, bf16=False)
    # Distillation scores whatever the rollouts are; greedy rollouts are allowed there.
    assert TipDistillConfig(generation_kwargs={"do_sample": False}, bf16=False).generation_kwargs == {"do_sample": False}


def test_paced_teacher_completions_in_another_format_than_the_prompts(tiny_model_paths, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS[:4], "completion": ["1", "3", "5", "7"], "answer": ["1"] * 4})
    with pytest.raises(ValueError, match="row 0 has a conversational `prompt` but a plain `completion`"):
        _build("paced", tiny_model_paths, tmp_path, dataset, rollout_source="teacher", kl_schedule="forward",
               teacher_completions="auto")
    missing = Dataset.from_dict({"prompt": PROMPTS[:2], "completion": [[{"role": "assistant", "content": "1"}], []],
                                 "answer": ["1"] * 2})
    with pytest.raises(ValueError, match="row 1 has an empty `completion`"):
        _build("paced", tiny_model_paths, tmp_path, missing, rollout_source="teacher", kl_schedule="forward",
               teacher_completions="dataset")
    # A student-rollout run never reads the completions, so their format does not matter there.
    trainer = _build("paced", tiny_model_paths, tmp_path, dataset)
    assert not trainer.pass_rate_table.is_estimated


def test_model_written_mask_leaves_out_tool_tokens():
    from trl_tip.trainers._inputs import model_written_mask

    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(model_written_mask({"completion_mask": completion_mask}), completion_mask)
    tool_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert model_written_mask({"completion_mask": completion_mask, "tool_mask": tool_mask}).tolist() == [
        [1, 0, 1, 0],
        [1, 1, 0, 0],
    ]


def test_reward_function_name_is_the_name_trl_logs():
    import functools

    from trl_tip import math_reward
    from trl_tip.trainers._inputs import reward_function_name

    class LengthReward:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    assert reward_function_name(math_reward) == "math_reward"
    assert reward_function_name(LengthReward()) == "LengthReward"
    assert reward_function_name(functools.partial(math_reward)) == "partial"
