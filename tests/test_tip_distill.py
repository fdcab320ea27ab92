from functools import partial

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DistillationConfig, DistillationTrainer

from trl_tip import TipDistillConfig, TipDistillTrainer
from trl_tip.selection import tokens_per_rollout
from builders import training_config
from numerics import GradientRecorder, assert_same_gradients


NUM_PROBLEMS = 32

# TRL's own config pins memory, which torch warns about without an accelerator; trl_tip's do not there.
_config = partial(training_config, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                  max_completion_length=16, dataloader_pin_memory=False)


def _train(trainer_cls, config, paths, dataset, **kwargs):
    trainer = trainer_cls(model=paths["student"], teacher_model=paths["teacher"], args=config, train_dataset=dataset,
                          **kwargs)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="token_selection must be one of"):
        TipDistillConfig(token_selection="entropy", bf16=False)
    with pytest.raises(ValueError, match=r"token_ratio must be in \(0, 1\]"):
        TipDistillConfig(token_ratio=0.0, bf16=False)
    with pytest.raises(ValueError, match=r"token_ratio must be in \(0, 1\]"):
        TipDistillConfig(token_ratio=1.5, bf16=False)
    with pytest.raises(ValueError, match="entropy_clip_quantile"):
        TipDistillConfig(entropy_clip_quantile=0.0, bf16=False)
    config = TipDistillConfig(bf16=False)
    assert (config.token_selection, config.token_ratio, config.entropy_clip_quantile, config.beta) == (
        "soft_or", 0.5, 0.98, 1.0)


def test_trainer_needs_its_own_config(tiny_model_paths, problems, tmp_path):
    with pytest.raises(TypeError, match="needs a TipDistillConfig"):
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                          args=_config(DistillationConfig, tmp_path), train_dataset=problems)


@pytest.mark.parametrize("gradient_accumulation_steps", [1, 2])
def test_all_reproduces_trl_distillation_trainer_exactly(tiny_model_paths, problems, tmp_path,
                                                         gradient_accumulation_steps):
    extra = {"gradient_accumulation_steps": gradient_accumulation_steps, "per_device_train_batch_size": 4}
    trl_trainer, trl_losses = _train(DistillationTrainer, _config(DistillationConfig, tmp_path / "trl", **extra),
                                     tiny_model_paths, problems)
    tip_trainer, tip_losses = _train(
        TipDistillTrainer, _config(TipDistillConfig, tmp_path / "tip", token_selection="all", **extra),
        tiny_model_paths, problems)
    assert len(tip_losses) == 3 and tip_losses == trl_losses
    for (name, trl_param), (_, tip_param) in zip(trl_trainer.model.named_parameters(),
                                                 tip_trainer.model.named_parameters(), strict=True):
        assert torch.equal(trl_param, tip_param), name


def test_soft_or_trains_on_half_the_tokens_and_logs(tiny_model_paths, problems, tmp_path):
    trainer, losses = _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path), tiny_model_paths, problems)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"])
    changed = [not torch.equal(p, q) for p, q in zip(initial.parameters(), trainer.model.parameters(), strict=True)]
    assert all(changed)
    assert all(torch.isfinite(torch.tensor(losses)))
    logs = [entry for entry in trainer.state.log_history if "tip/kept_fraction" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert 0.45 <= entry["tip/kept_fraction"] <= 0.6  # ⌊m/2⌋ (at least 1) of each rollout
        shares = [entry[f"tip/q{i}_share"] for i in range(1, 5)]
        assert sum(shares) == pytest.approx(1.0)
        # soft-OR keeps the high-entropy / high-divergence tokens.
        assert entry["tip/entropy_kept"] >= entry["tip/entropy_all"]
        assert entry["tip/divergence_kept"] >= entry["tip/divergence_all"]


def test_num_items_in_batch_counts_kept_tokens(tiny_model_paths, problems, tmp_path):
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path, token_ratio=0.3), train_dataset=problems)
    output = trainer._generate_and_score_completions([problems[i] for i in range(8)])
    expected = tokens_per_rollout(output["completion_mask"], 0.3).sum()
    assert output["num_items_in_batch"].item() == expected.item()
    assert expected < output["completion_mask"].sum()


def test_gradient_accumulation_normalises_like_one_big_batch(tiny_model_paths, problems, tmp_path):
    # A rule without batch statistics selects the same tokens whatever the micro-batch, so one step over 8 rollouts
    # must equal two accumulated micro-batches of 4.
    common = {"token_selection": "divergence_topk", "max_steps": 1}
    one, two = GradientRecorder(), GradientRecorder()
    _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path / "a", per_device_train_batch_size=8, **common),
           tiny_model_paths, problems, callbacks=[one])
    _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path / "b", per_device_train_batch_size=4,
                                      gradient_accumulation_steps=2, **common), tiny_model_paths, problems,
           callbacks=[two])
    assert_same_gradients(one, two)


def test_lora_student_trains_adapters_only(tiny_model_paths, problems, tmp_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, losses = _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path, max_steps=2), tiny_model_paths,
                             problems, peft_config=peft_config)
    assert len(losses) == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"]).state_dict()
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(param, torch.zeros_like(param)), name
        elif "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base[key]), name


def test_nan_loss_is_never_stepped(tiny_model_paths, problems, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_paths["teacher"])
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher,
                                args=_config(TipDistillConfig, tmp_path, max_steps=1), train_dataset=problems)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(FloatingPointError, match="refusing to step"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters(), strict=True))


def test_dataset_without_prompt_is_a_clear_error(tiny_model_paths, tmp_path):
    data = Dataset.from_dict({"question": ["1+1"] * 8})
    with pytest.raises(ValueError, match="no `prompt` column"):
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                          args=_config(TipDistillConfig, tmp_path, max_steps=1), train_dataset=data)


def test_divergence_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="selection_divergence must be one of"):
        TipDistillConfig(selection_divergence="tvd", bf16=False)
    with pytest.raises(ValueError, match="does not rank by divergence"):
        TipDistillConfig(token_selection="entropy_topk", selection_divergence="jsd", bf16=False)
    with pytest.raises(ValueError, match=r"divergence_clip_quantile must be in \(0, 1\]"):
        TipDistillConfig(divergence_clip_quantile=0.0, bf16=False)
    with pytest.raises(ValueError, match="applies only with token_selection='soft_or'"):
        TipDistillConfig(token_selection="soft_or", selection_divergence="jsd", divergence_clip_quantile=0.9,
                         bf16=False)
    with pytest.raises(ValueError, match="applies only with token_selection='soft_or'"):
        TipDistillConfig(token_selection="divergence_topk", divergence_clip_quantile=0.9, bf16=False)
    config = TipDistillConfig(bf16=False)
    assert (config.divergence_clip_quantile, config.selection_divergence) == (1.0, "reverse_kl")


@pytest.mark.parametrize("options", [{"selection_divergence": "jsd"}, {"divergence_clip_quantile": 0.9}],
                         ids=["jsd", "clipped"])
def test_divergence_options_train_and_log_the_spread_of_the_divergence_axis(tiny_model_paths, problems, tmp_path,
                                                                              options):
    trainer, losses = _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path, max_steps=2, **options),
                             tiny_model_paths, problems)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    logs = [entry for entry in trainer.state.log_history if "tip/divergence_hat_p50" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert 0.0 <= entry["tip/divergence_hat_p50"] <= entry["tip/divergence_hat_p90"] <= 1.0


@pytest.mark.parametrize("token_selection", ["random", "entropy_sample"])
def test_resume_with_sampled_selection_repeats_the_uninterrupted_run(tiny_model_paths, problems, tmp_path,
                                                                     token_selection):
    # The selection generator is saved per process in every checkpoint and restored on resume, so the resumed run
    # draws the same tokens as the uninterrupted one and ends on bit-identical parameters.
    settings = {"token_selection": token_selection, "max_steps": 4, "per_device_train_batch_size": 4,
                "save_strategy": "steps", "save_steps": 2}
    whole, _ = _train(TipDistillTrainer, _config(TipDistillConfig, tmp_path / "whole", **settings), tiny_model_paths,
                      problems)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "tip_selection_rng_0.pth").is_file()
    resumed = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path / "resumed", **settings),
                                train_dataset=problems)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, whole_param), (_, resumed_param) in zip(whole.model.named_parameters(),
                                                       resumed.model.named_parameters(), strict=True):
        assert torch.equal(whole_param, resumed_param), name
