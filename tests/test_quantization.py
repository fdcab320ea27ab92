"""QLoRA students and separately quantised teachers, on CPU (bitsandbytes runs 4-bit layers on CPU)."""

from functools import partial

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback

from trl_tip import OPSDCConfig, OPSDCTrainer, TipDistillConfig, TipDistillTrainer
from trl_tip.trainers.opsdc import TEACHER_ADAPTER_NAME, _AdapterSnapshot
from builders import training_config


pytest.importorskip("bitsandbytes")


def _is_4bit(module):
    return type(module).__name__ == "Linear4bit"


_config = partial(training_config, per_device_train_batch_size=4, max_steps=2, max_completion_length=8,
                  learning_rate=1e-2)


def _student_4bit():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def test_qlora_student_trains_adapters_and_leaves_the_4bit_base(tiny_model_paths, problems, tmp_path):
    trainer = TipDistillTrainer(
        model=tiny_model_paths["student"],
        teacher_model=tiny_model_paths["teacher"],
        args=_config(TipDistillConfig, tmp_path),
        train_dataset=problems,
        quantization_config=_student_4bit(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert _is_4bit(q_proj.base_layer)
    base_before = q_proj.base_layer.weight.detach().clone()
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters_before and all("lora_" in n for n in adapters_before)
    # The student's 4-bit config did not reach the teacher.
    assert not any(_is_4bit(m) for m in trainer.teacher_model.modules())
    trainer.train()
    assert torch.equal(q_proj.base_layer.weight, base_before)
    changed = [not torch.equal(p, adapters_before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(changed)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_teacher_quantization_is_its_own_choice(tiny_model_paths, problems, tmp_path):
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path, teacher_quantization="4bit"),
                                train_dataset=problems)
    assert any(_is_4bit(m) for m in trainer.teacher_model.modules())
    assert not any(_is_4bit(m) for m in trainer.model.modules())
    # The lm_head stays in full precision: the chunked divergence reads its weight directly.
    assert not _is_4bit(trainer.teacher_model.get_output_embeddings())
    assert trainer.args.teacher_model_init_kwargs is None  # the config object is left as the user built it
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_teacher_quantization_errors():
    with pytest.raises(ValueError, match="teacher_quantization must be one of"):
        TipDistillConfig(teacher_quantization="int4", bf16=False)
    with pytest.raises(ValueError, match="not both"):
        TipDistillConfig(teacher_quantization="4bit", bf16=False,
                         teacher_model_init_kwargs={"quantization_config": {"load_in_4bit": True}})


def test_teacher_quantization_needs_a_teacher_path(tiny_model_paths, problems, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_paths["teacher"])
    with pytest.raises(ValueError, match="pass `teacher_model` as a path"):
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher,
                          args=_config(TipDistillConfig, tmp_path, teacher_quantization="4bit"),
                          train_dataset=problems)


class _RecordTeacher(TrainerCallback):
    """After each step (and after the trainer's refresh): is the teacher adapter the initial one, the student's?"""

    def __init__(self, trainer, initial):
        self.trainer, self.initial, self.seen = trainer, initial, []

    def on_step_end(self, args, state, control, **kwargs):
        pairs = self.trainer._snapshot_pairs()
        self.seen.append((
            all(torch.equal(teacher, self.initial[name]) for name, teacher, _ in pairs),
            all(torch.equal(teacher, student) for _, teacher, student in pairs),
        ))


@pytest.mark.parametrize("gradient_checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_qlora_opsdc_student_trains_its_adapter_against_a_frozen_teacher_adapter(
    tiny_model_paths, problems, tmp_path, gradient_checkpointing
):
    # The teacher's forward runs the shared 4-bit base with gradients off. On a CPU with AVX512-BF16, bitsandbytes
    # repacks eval-mode 4-bit weights for inference there, after which the student's next forward with gradients (the
    # checkpointed recomputation, or the next step) fails in `matmul_4bit`; on other CPUs this passes either way.
    overrides = {} if gradient_checkpointing else {"gradient_checkpointing": False}
    args = _config(OPSDCConfig, tmp_path, teacher_refresh_steps=2, **overrides)
    assert args.gradient_checkpointing is gradient_checkpointing  # on by default
    trainer = OPSDCTrainer(
        model=tiny_model_paths["student"],
        args=args,
        train_dataset=problems,
        quantization_config=_student_4bit(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    layers_4bit = [m for m in peft_model.modules() if _is_4bit(m)]
    assert layers_4bit
    # The teacher is the second adapter on the same (4-bit) base: it holds no weights of its own.
    assert isinstance(trainer.teacher_model, _AdapterSnapshot) and trainer.teacher_model.peft_model is peft_model
    assert list(trainer.teacher_model.parameters()) == []
    assert TEACHER_ADAPTER_NAME in peft_model.peft_config

    def is_adapter(name):
        return ".lora_" in name

    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not is_adapter(n)}
    student_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert student_before and all(".default." in n for n in student_before)
    teacher_before = {name: teacher.detach().clone() for name, teacher, _ in trainer._snapshot_pairs()}
    recorder = _RecordTeacher(trainer, teacher_before)
    trainer.add_callback(recorder)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, student_before[n]) for n, p in peft_model.named_parameters() if n in student_before)
    # The 4-bit base (weights, quantisation state, biases) and the other frozen weights are untouched.
    assert all(torch.equal(p, base_before[n]) for n, p in peft_model.named_parameters() if not is_adapter(n))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers_4bit)
    # Only the student adapter trains; the teacher adapter moved only at the refresh after step 2.
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == list(student_before)
    assert peft_model.active_adapter == "default"
    assert recorder.seen == [(True, False), (False, True)]
    assert trainer.teacher_refreshes == 2


def test_qlora_paced_student_trains_adapters_and_leaves_the_4bit_base(tiny_model_paths, problems, tmp_path):
    from trl_tip import PacedConfig, PacedTrainer

    args = _config(PacedConfig, tmp_path, pass_rate_rollouts=2, paced_alpha=0.0, paced_beta=0.0,
                   teacher_quantization="4bit")
    trainer = PacedTrainer(
        model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"], args=args,
        train_dataset=problems, reward_funcs="math", quantization_config=_student_4bit(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert _is_4bit(q_proj.base_layer)
    assert any(_is_4bit(m) for m in trainer.teacher_model.modules())  # its own choice, 4-bit here
    base_before = q_proj.base_layer.weight.detach().clone()
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert torch.equal(q_proj.base_layer.weight, base_before)
    assert any(not torch.equal(p, adapters_before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_qlora_student_trains_after_evaluation(tiny_model_paths, problems, tmp_path):
    # Evaluation runs the student in eval mode without gradient; on AVX512-BF16 CPUs bitsandbytes would then repack
    # its 4-bit weights into an inference-only layout and the next training step would fail.
    trainer = TipDistillTrainer(
        model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
        args=_config(TipDistillConfig, tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4),
        train_dataset=problems, eval_dataset=problems.select(range(4)), quantization_config=_student_4bit(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [1, 2]


def _distinct_characters(completions, **kwargs):
    # A reward that varies between rollouts of a random tiny model, so GRPO has advantages to learn from.
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


def test_qlora_ace_grpo_student_uses_the_adapter_free_base_as_reference(tiny_model_paths, problems, tmp_path):
    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer

    args = _config(ACEGRPOConfig, tmp_path, num_generations=4, beta=0.0)
    trainer = ACEGRPOTrainer(
        model=tiny_model_paths["student"], reward_funcs=_distinct_characters, args=args, train_dataset=problems,
        quantization_config=_student_4bit(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert _is_4bit(q_proj.base_layer)
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled: no second copy
    base_before = q_proj.base_layer.weight.detach().clone()
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert torch.equal(q_proj.base_layer.weight, base_before)
    assert any(not torch.equal(p, adapters_before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    logs = [entry for entry in trainer.state.log_history if "ace/confidence_shift_mean" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
