"""Bad inputs fail at construction, with a message naming the field, before any model generates anything."""

import pytest
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
)
from trl_tip.testing import build_tokenizer


COMMON = {"bf16": False, "report_to": "none", "save_strategy": "no", "max_steps": 1, "per_device_train_batch_size": 4,
          "max_completion_length": 8, "disable_tqdm": True}
PROMPTS = [[{"role": "user", "content": f"{a}+{a + 1}"}] for a in range(8)]


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


def _build(trainer, paths, tmp_path, train_dataset, eval_dataset=None, **config):
    """Construct one of the four trainers on the tiny models, with `config` overriding the defaults above."""
    fields = {"output_dir": str(tmp_path), **COMMON, **config}
    if trainer == "tip":
        return TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"], args=TipDistillConfig(**fields),
                                 train_dataset=train_dataset, eval_dataset=eval_dataset)
    if trainer == "paced":
        return PacedTrainer(model=paths["student"], teacher_model=paths["teacher"], args=PacedConfig(**fields),
                            train_dataset=train_dataset, eval_dataset=eval_dataset, reward_funcs=_reward)
    if trainer == "opsdc":
        return OPSDCTrainer(paths["student"], args=OPSDCConfig(**fields), train_dataset=train_dataset,
                            eval_dataset=eval_dataset, processing_class=build_tokenizer())
    return ACEGRPOTrainer(model=paths["student"], reward_funcs=_reward,
                          args=ACEGRPOConfig(num_generations=4, **fields), train_dataset=train_dataset,
                          eval_dataset=eval_dataset)


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
        _build("paced", tiny_model_paths, tmp_path, dataset, rollout_source="teacher", kl_schedule="forward")
    missing = Dataset.from_dict({"prompt": PROMPTS[:2], "completion": [[{"role": "assistant", "content": "1"}], []],
                                 "answer": ["1"] * 2})
    with pytest.raises(ValueError, match="row 1 has an empty `completion`"):
        _build("paced", tiny_model_paths, tmp_path, missing, rollout_source="teacher", kl_schedule="forward")
    # A student-rollout run never reads the completions, so their format does not matter there.
    trainer = _build("paced", tiny_model_paths, tmp_path, dataset)
    assert not trainer.pass_rate_table.is_estimated
