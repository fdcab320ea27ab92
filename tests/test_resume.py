"""Every trainer resumes bit-exactly, at an epoch end too, and `resume_from_checkpoint=True` skips cut-off saves."""

import json
import os
import shutil
from functools import partial

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerState
from trl.trainer.utils import RepeatSampler

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
from trl_tip.resume import EpochSeededRepeatSampler, atomic_path, checkpoint_problem, last_complete_checkpoint
from trl_tip.tiny_models import build_tokenizer
from builders import training_config


# Eight problems in batches of four prompts: two optimiser steps per epoch, so checkpoint-2 ends epoch 0.
PROMPTS = [[{"role": "user", "content": f"{a}+{a + 7}"}] for a in range(10, 18)]
_config = partial(training_config, max_completion_length=8, learning_rate=1e-2, max_steps=3, save_strategy="steps",
                  save_steps=2)


def _parity_reward(completions, **kwargs):
    # Deterministic, and different between a problem's rollouts, so PACED's pass rates fall strictly between 0 and 1.
    return [float(len(completion[0]["content"]) % 2) for completion in completions]


def _build(trainer, paths, output_dir, **config):
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    if trainer == "tip":
        return TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"],
                                 args=_config(TipDistillConfig, output_dir, per_device_train_batch_size=4, **config),
                                 train_dataset=dataset)
    if trainer.startswith("paced"):
        sampling = trainer.split("-")[1]
        return PacedTrainer(model=paths["student"], teacher_model=paths["teacher"], reward_funcs=_parity_reward,
                            args=_config(PacedConfig, output_dir, per_device_train_batch_size=4, pass_rate_rollouts=4,
                                         paced_sampling=sampling, **config),
                            train_dataset=dataset)
    if trainer == "opsdc":
        # A refresh inside the resumed part: the teacher snapshot restored from the checkpoint is the one refreshed.
        return OPSDCTrainer(paths["student"],
                            args=_config(OPSDCConfig, output_dir, per_device_train_batch_size=4,
                                         teacher_refresh_steps=2, **config),
                            train_dataset=dataset, processing_class=build_tokenizer())
    # GRPO: 16 rollouts per step, four prompts of four.
    return ACEGRPOTrainer(model=paths["student"], reward_funcs=_parity_reward,
                          args=_config(ACEGRPOConfig, output_dir, per_device_train_batch_size=16, num_generations=4,
                                       **config),
                          train_dataset=dataset)


def _max_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_epoch_seeded_sampler_draws_what_trls_sampler_draws_in_one_run():
    settings = {"data_source": list(range(10)), "mini_repeat_count": 2, "batch_size": 3, "repeat_count": 2, "seed": 5}
    trl_sampler = RepeatSampler(**settings)
    passes = [list(trl_sampler) for _ in range(3)]
    assert passes[0] != passes[1] != passes[2]
    for epoch, expected in enumerate(passes):
        # A fresh sampler (a resumed process) set to the epoch draws that epoch's order, as often as it is iterated.
        sampler = EpochSeededRepeatSampler.from_sampler(RepeatSampler(**settings))
        sampler.set_epoch(epoch)
        assert list(sampler) == expected and list(sampler) == expected
    unshuffled = EpochSeededRepeatSampler(list(range(4)), mini_repeat_count=1, shuffle=False)
    unshuffled.set_epoch(3)
    assert list(unshuffled) == [0, 1, 2, 3]


@pytest.mark.parametrize("trainer", ["tip", "paced-weight", "paced-sample", "opsdc", "ace"])
def test_resume_at_an_epoch_end_past_a_cut_off_checkpoint_is_exact(tiny_model_paths, tmp_path, trainer, monkeypatch):
    whole = _build(trainer, tiny_model_paths, tmp_path / "whole")
    # The trainer state, which makes a checkpoint complete, is written after the trainer's own files.
    own_files, written = whole._checkpoint_files(), []
    save_state = TrainerState.save_to_json

    def save_state_after_own_files(state, json_path):
        folder = os.path.dirname(json_path)
        assert [name for name in own_files if not os.path.isfile(os.path.join(folder, name))] == []
        written.append(folder)
        save_state(state, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_state_after_own_files)
    sampler = whole._get_train_sampler()
    assert isinstance(sampler, EpochSeededRepeatSampler)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] != orders[1]  # otherwise replaying epoch 0 would go unnoticed
    whole.train()
    assert len(own_files) == {"tip": 1, "paced-weight": 2, "paced-sample": 2, "opsdc": 2, "ace": 0}[trainer]
    assert [os.path.basename(folder) for folder in written] == ["checkpoint-2", "checkpoint-3"]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"])
    assert _max_difference(whole.model, initial) > 0  # the run trains

    # A run stopped after checkpoint-2, the end of epoch 0, while saving checkpoint-3: only its config got written.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed_dir / "checkpoint-2")
    (resumed_dir / "checkpoint-3").mkdir()
    shutil.copy(tmp_path / "whole" / "checkpoint-2" / "config.json", resumed_dir / "checkpoint-3")
    resumed = _build(trainer, tiny_model_paths, resumed_dir)
    with pytest.warns(UserWarning, match=r"Skipping .*checkpoint-3 when resuming: it has no trainer_state\.json"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    difference = _max_difference(whole.model, resumed.model)
    assert difference == 0.0, f"max |Δθ| = {difference} between the uninterrupted and the resumed run"


def test_resume_true_without_a_complete_checkpoint_says_so(tiny_model_paths, tmp_path):
    trainer = _build("tip", tiny_model_paths, tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="checkpoint-2"), pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def _checkpoint(path, files=("model.safetensors", "trainer_state.json")):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_last_complete_checkpoint_skips_every_kind_of_cut_off_save(tmp_path):
    complete = _checkpoint(tmp_path / "checkpoint-10")
    _checkpoint(tmp_path / "checkpoint-9", files=("model.safetensors", "trainer_state.json", "own.json"))
    _checkpoint(tmp_path / "checkpoint-12", files=("config.json",))
    (_checkpoint(tmp_path / "checkpoint-14") / "trainer_state.json").write_text('{"global_step": 1')
    _checkpoint(tmp_path / "checkpoint-16", files=("trainer_state.json",))
    _checkpoint(tmp_path / "checkpoint-18-old")  # not a checkpoint folder name
    assert last_complete_checkpoint(tmp_path) == (str(complete), [
        (str(tmp_path / "checkpoint-16"), "it has no model weights"),
        (str(tmp_path / "checkpoint-14"), "its trainer_state.json is cut off"),
        (str(tmp_path / "checkpoint-12"), "it has no trainer_state.json"),
    ])
    # A trainer's own file is required too: numbers compare as numbers (9 < 10 < 12).
    path, skipped = last_complete_checkpoint(tmp_path, required_files=["own.json"])
    assert path == str(tmp_path / "checkpoint-9") and skipped[-1] == (str(complete), "it has no own.json")
    assert last_complete_checkpoint(tmp_path / "missing") == (None, [])
    # DeepSpeed's engine state and PEFT adapters count as weights.
    deepspeed = _checkpoint(tmp_path / "ds", files=("trainer_state.json",))
    assert checkpoint_problem(deepspeed) == "it has no model weights"
    (deepspeed / "global_step4").mkdir()
    assert checkpoint_problem(deepspeed) is None
    assert checkpoint_problem(_checkpoint(tmp_path / "lora", files=("adapter_model.safetensors",
                                                                    "trainer_state.json"))) is None


def test_atomic_path_leaves_the_previous_file_when_the_write_fails(tmp_path):
    target = tmp_path / "state.json"
    with atomic_path(target) as temporary, open(temporary, "w") as file:
        json.dump({"step": 1}, file)
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        with open(temporary, "w") as file:
            file.write('{"step": ')
        raise RuntimeError("stopped mid-save")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]
