import copy
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import DistillationTrainer

from trl_tip import CONCISE_INSTRUCTIONS, OPSDCConfig, OPSDCTrainer, math_reward
from trl_tip.instructions import _add_instruction
from trl_tip.tiny_models import build_tokenizer
from trl_tip.trainers.opsdc import OPSDC_STATE_NAME, TEACHER_ADAPTER_NAME, TEACHER_SNAPSHOT_NAME
import reference
from builders import training_config
from numerics import GradientRecorder, assert_same_gradients
from test_instructions import DAPO_LEAD, DAPO_PROBLEM, DAPO_PROMPT, INSTRUCTION


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The tiny models run far faster on one thread than with several threads fighting for shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_config = partial(training_config, OPSDCConfig, per_device_train_batch_size=4, max_completion_length=8, max_steps=2,
                  learning_rate=1e-3, concise_instruction=INSTRUCTION, gradient_checkpointing=False)


def make_trainer(tiny_model_paths, dataset, config, **kwargs):
    return OPSDCTrainer(
        tiny_model_paths["student"], args=config, train_dataset=dataset, processing_class=build_tokenizer(), **kwargs
    )


def snapshot_equals_student(trainer):
    return all(torch.equal(teacher, student) for _, teacher, student in trainer._snapshot_pairs())


# ---- Configuration and construction ----


def test_config_defaults_and_validation(tmp_path):
    config = OPSDCConfig(str(tmp_path), bf16=False)
    assert config.concise_instruction == "v2" and config.concise_instruction_text == CONCISE_INSTRUCTIONS["v2"]
    assert config.teacher_refresh_steps == 50 and config.instruction_position == "before"
    assert config.beta == 1.0  # reverse KL
    assert config.lr_scheduler_type == "constant" and config.weight_decay == 0.01
    with pytest.raises(ValueError, match="teacher_refresh_steps"):
        OPSDCConfig(str(tmp_path), bf16=False, teacher_refresh_steps=0)
    with pytest.raises(ValueError, match="'v3'"):
        OPSDCConfig(str(tmp_path), bf16=False, concise_instruction="v3")
    with pytest.raises(ValueError, match="instruction_position"):
        OPSDCConfig(str(tmp_path), bf16=False, instruction_position="middle")
    with pytest.raises(ValueError, match="snapshot of the student"):
        OPSDCConfig(str(tmp_path), bf16=False, teacher_model_name_or_path="some/teacher")
    with pytest.warns(UserWarning, match="forward KL"):
        OPSDCConfig(str(tmp_path), bf16=False, beta=0.0)


def test_trainer_rejects_a_teacher_and_unusable_prompts(tiny_model_paths, problems, tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="teacher_model"):
        make_trainer(tiny_model_paths, problems, config, teacher_model=tiny_model_paths["teacher"])
    text_prompts = Dataset.from_dict({"prompt": ["1+2", "3+4"]})
    with pytest.raises(ValueError, match="conversational"):
        make_trainer(tiny_model_paths, text_prompts, _config(tmp_path, instruction_position="system"))
    with pytest.raises(ValueError, match="Unknown reward 'some/reward-model'.*Reward models are not supported"):
        make_trainer(tiny_model_paths, problems, config, reward_funcs="some/reward-model")
    with pytest.raises(TypeError, match="OPSDCTrainer's reward_funcs must be callables"):
        make_trainer(tiny_model_paths, problems, config, reward_funcs=[3])


def test_fsdp1_is_refused_before_the_model_loads(problems, tmp_path, monkeypatch):
    # The model path does not exist: reaching the model loader would fail with another error.
    missing_model = str(tmp_path / "never-loaded")
    config = OPSDCConfig(str(tmp_path), bf16=False, fsdp="full_shard", fsdp_config={"version": 1})
    with pytest.raises(ValueError, match="FSDP version 1.*FSDP2"):
        OPSDCTrainer(model=missing_model, args=config, train_dataset=problems)
    # The same limit when `accelerate launch` sets FSDP from its config file.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1"):
        OPSDCTrainer(model=missing_model, args=OPSDCConfig(str(tmp_path), bf16=False), train_dataset=problems)


# ---- Teacher input and loss ----


@pytest.fixture
def hidden_state_calls(monkeypatch):
    """Records every (model, input_ids, attention_mask, logits_to_keep) that reaches TRL's backbone call."""
    calls = []
    original = DistillationTrainer._get_last_hidden_state

    def recording(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        calls.append((unwrapped_model, input_ids.clone(), attention_mask.clone(), logits_to_keep))
        return original(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "_get_last_hidden_state", recording)
    return calls


def test_teacher_reads_instruction_and_the_students_completion(
    tiny_model_paths, problems, tmp_path, hidden_state_calls
):
    trainer = make_trainer(tiny_model_paths, problems, _config(tmp_path, max_steps=1))
    trainer.train()

    assert len(hidden_state_calls) == 2  # one micro-batch: the student, then the teacher
    student_call, teacher_call = hidden_state_calls
    (student_model, student_ids, student_mask, keep), (teacher_model, teacher_ids, teacher_mask, teacher_keep) = (
        student_call,
        teacher_call,
    )
    assert student_model is trainer.model and teacher_model is trainer.teacher_model
    assert keep == teacher_keep
    tokenizer = build_tokenizer()
    # The same completion tokens, at the end of both sequences, under the same mask.
    assert torch.equal(teacher_ids[:, -keep:], student_ids[:, -keep:])
    assert torch.equal(teacher_mask[:, -keep:], student_mask[:, -keep:])
    # Only the teacher's prompt carries the instruction, before the problem.
    for row in range(student_ids.size(0)):
        teacher_prompt = tokenizer.decode(teacher_ids[row, :-keep], skip_special_tokens=True)
        student_prompt = tokenizer.decode(student_ids[row, :-keep], skip_special_tokens=True)
        problem = student_prompt.removeprefix("user\n").split("assistant")[0].strip()
        assert f"{INSTRUCTION}\n\n{problem}" in teacher_prompt
        assert INSTRUCTION not in student_prompt


def test_plain_text_prompts_with_the_instruction_after(tiny_model_paths, tmp_path, hidden_state_calls):
    dataset = Dataset.from_dict({"prompt": [f"{a}+{a + 7}=" for a in range(10, 18)]})
    config = _config(tmp_path, max_steps=1, instruction_position="after")
    trainer = make_trainer(tiny_model_paths, dataset, config)
    trainer.train()
    (_, student_ids, _, keep), (_, teacher_ids, _, _) = hidden_state_calls
    tokenizer = build_tokenizer()
    assert torch.equal(teacher_ids[:, -keep:], student_ids[:, -keep:])
    for row in range(student_ids.size(0)):
        student_prompt = tokenizer.decode(student_ids[row, :-keep], skip_special_tokens=True)
        teacher_prompt = tokenizer.decode(teacher_ids[row, :-keep], skip_special_tokens=True)
        assert teacher_prompt == f"{student_prompt}\n\n{INSTRUCTION}"


def test_loss_is_zero_when_teacher_equals_student_on_identical_prompts(tiny_model_paths, problems, tmp_path):
    trainer = make_trainer(tiny_model_paths, problems, _config(tmp_path))
    tokenizer = build_tokenizer()
    prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in problems["prompt"][:3]]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_prompt_ids": prompt_ids,
        "teacher_prompt_mask": prompt_mask,
    }
    student = trainer.accelerator.unwrap_model(trainer.model)
    loss, _, n_valid = trainer._compute_loss(student, inputs, None)
    assert n_valid.item() == 15
    assert loss.item() == 0.0  # the same weights on the same inputs: the same float operations

    # With the instruction in the teacher's prompt the same completion is scored differently.
    instructed = [_add_instruction(p, INSTRUCTION) for p in problems["prompt"][:3]]
    instructed_ids, _, _ = trainer._tokenize_prompts(instructed)
    width = max(map(len, instructed_ids))
    inputs["teacher_prompt_ids"] = torch.tensor(
        [[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in instructed_ids]
    )
    inputs["teacher_prompt_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in instructed_ids])
    loss, _, _ = trainer._compute_loss(student, inputs, None)
    assert loss.item() > 1e-6


def test_identical_views_give_exactly_zero_loss_and_gradient(tiny_model_paths, problems, tmp_path, monkeypatch):
    # An empty instruction is refused by the config, so the trainer is built with one and its teacher prompt is then
    # made the student's prompt unchanged. Through the trainer's own generation output and loss (TRL's
    # `compute_loss`, training mode), the teacher (the step-0 snapshot, the same weights) reads the same tokens with
    # the same padding and positions as the student, and runs the same float operations: the per-token KL is
    # log p - log p = 0 exactly, and so is every gradient (the kernel's gradient is p·(log p - log p - KL)).
    from trl_tip.trainers.opsdc import opsdc_trainer

    trainer = make_trainer(tiny_model_paths, problems, _config(tmp_path))
    monkeypatch.setattr(opsdc_trainer, "build_teacher_prompt", lambda prompt, *args, **kwargs: (prompt, False))
    trainer.model.train()
    rows = [dict(problems[i]) for i in range(4)]
    student = trainer.accelerator.unwrap_model(trainer.model)
    parameters = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    for normalization in ("rollout", "token"):
        trainer.args.loss_normalization = normalization
        torch.manual_seed(0)
        output = trainer._generate_and_score_completions(rows)
        assert torch.equal(output["teacher_prompt_ids"], output["prompt_ids"])
        assert torch.equal(output["teacher_prompt_mask"], output["prompt_mask"])
        assert output["completion_mask"].sum() > 0
        assert ("opsdc_rollout_weights" in output) == (normalization == "rollout")
        student.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, output)
        loss.backward()
        assert loss.item() == 0.0, normalization
        # Every trainable parameter is in the graph and its gradient is exactly zero.
        assert all(p.grad is not None for _, p in parameters)
        nonzero = [name for name, p in parameters if torch.count_nonzero(p.grad) > 0]
        assert nonzero == [], (normalization, nonzero)


# ---- Refresh schedule ----


class RecordSteps(TrainerCallback):
    """Records, after each optimiser step (and after the teacher refresh), whether the teacher equals the student."""

    def __init__(self):
        self.trainer, self.records = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.records.append((state.global_step, self.trainer.teacher_refreshes, snapshot_equals_student(self.trainer)))


def test_teacher_refreshes_every_m_steps_and_logs(tiny_model_paths, problems, tmp_path):
    recorder = RecordSteps()
    config = _config(tmp_path, max_steps=5, teacher_refresh_steps=2)
    trainer = make_trainer(tiny_model_paths, problems, config, callbacks=[recorder], reward_funcs=math_reward)
    recorder.trainer = trainer
    assert trainer.teacher_refreshes == 1 and snapshot_equals_student(trainer)  # the snapshot at step 0
    trainer.train()
    # Refreshed at steps 0, 2, 4: equal to the student right after a refresh, different one update later.
    assert recorder.records == [(1, 1, False), (2, 2, True), (3, 2, False), (4, 3, True), (5, 3, False)]
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["opsdc/teacher_refreshes"] for entry in logs] == [1, 2, 2, 3, 3]
    for entry in logs:
        assert entry["opsdc/compression"] > 0 and 0.0 <= entry["opsdc/accuracy"] <= 1.0
        assert entry["rewards/math_reward/mean"] == entry["opsdc/accuracy"]
        assert entry["completions/mean_length"] > 0
    # The compression baseline is the first logging window (logging_steps=1: the first step).
    assert logs[0]["opsdc/compression"] == 1.0

    metrics = trainer.evaluate(problems.select(range(4)))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"])) and 0.0 <= metrics["eval_opsdc/accuracy"] <= 1.0
    assert metrics["eval_opsdc/compression"] > 0


# ---- LoRA ----


def test_lora_teacher_is_a_frozen_second_adapter(tiny_model_paths, problems, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = _config(tmp_path, max_steps=2, teacher_refresh_steps=100, learning_rate=1e-2)
    trainer = make_trainer(tiny_model_paths, problems, config, peft_config=lora)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    assert TEACHER_ADAPTER_NAME in peft_model.peft_config

    # No second base model: all tensors the trainer holds = base weights + two adapters of equal size.
    def unique_numel(*modules):
        seen = {}
        for module in modules:
            for parameter in module.parameters():
                seen[parameter.data_ptr()] = parameter.numel()
        return sum(seen.values())

    adapter_numel = sum(p.numel() for n, p in peft_model.named_parameters() if ".default." in n)
    teacher_numel = sum(p.numel() for n, p in peft_model.named_parameters() if f".{TEACHER_ADAPTER_NAME}." in n)
    base_numel = peft_model.get_base_model().num_parameters() - adapter_numel - teacher_numel
    assert adapter_numel == teacher_numel > 0
    assert unique_numel(trainer.model, trainer.teacher_model) == base_numel + 2 * adapter_numel

    initial_teacher = {name: t.clone() for name, t, _ in trainer._snapshot_pairs()}
    trainer.train()
    student_adapter = {id(p) for n, p in peft_model.named_parameters() if ".default." in n}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == student_adapter
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == [
        n for n, p in peft_model.named_parameters() if ".default." in n
    ]
    assert peft_model.active_adapter == "default"
    # The student adapter moved, the teacher adapter (no refresh within 100 steps) did not.
    assert not snapshot_equals_student(trainer)
    assert all(torch.equal(t, initial_teacher[name]) for name, t, _ in trainer._snapshot_pairs())
    trainer.refresh_teacher()
    assert snapshot_equals_student(trainer) and trainer.teacher_refreshes == 2

    # The saved model is the student's adapter only.
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "saved" / TEACHER_ADAPTER_NAME).exists()


def test_lora_update_is_the_same_with_gradient_checkpointing(tiny_model_paths, problems, tmp_path):
    # Checkpointing recomputes the student's forward during backward, after the teacher's forward switched adapters:
    # the update must still be the one computed with the student adapter (dropout on, as in training).
    # Compared on the gradients before the optimiser step (AdamW's first step amplifies float32 noise; see
    # tests/numerics.py), of the student adapter only.
    recorders = []
    for checkpointing in (False, True):
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights=False)
        config = _config(tmp_path, max_steps=1, gradient_checkpointing=checkpointing, learning_rate=1e-2)
        recorder = GradientRecorder()
        trainer = make_trainer(tiny_model_paths, problems, config, peft_config=lora, callbacks=[recorder])
        trainer.train()
        recorder.steps = [{n: g for n, g in step.items() if ".default." in n} for step in recorder.steps]
        recorders.append(recorder)
    assert recorders[0].steps[0].keys() == recorders[1].steps[0].keys()
    assert_same_gradients(*recorders)


# ---- Checkpoints ----


class CheckTeacherOnResume(TrainerCallback):
    def __init__(self, snapshot):
        self.trainer, self.snapshot, self.seen = None, snapshot, None

    def on_train_begin(self, args, state, control, **kwargs):
        pairs = self.trainer._snapshot_pairs()
        self.seen = (
            all(torch.equal(teacher.cpu(), self.snapshot[name]) for name, teacher, _ in pairs),
            snapshot_equals_student(self.trainer),
            self.trainer.teacher_refreshes,
        )


def test_checkpoint_saves_teacher_and_resume_restores_it(tiny_model_paths, problems, tmp_path):
    config = _config(tmp_path, max_steps=3, teacher_refresh_steps=2, save_strategy="steps", save_steps=3)
    trainer = make_trainer(tiny_model_paths, problems, config)
    trainer.train()
    checkpoint = Path(config.output_dir) / "checkpoint-3"
    snapshot = load_file(checkpoint / TEACHER_SNAPSHOT_NAME)
    state = json.loads((checkpoint / OPSDC_STATE_NAME).read_text())
    assert state["teacher_refreshes"] == 2 and state["teacher_refreshed_at_step"] == 2
    assert all(torch.equal(t, snapshot[name]) for name, t, _ in trainer._snapshot_pairs())

    check = CheckTeacherOnResume(snapshot)
    config = _config(tmp_path, max_steps=4, teacher_refresh_steps=2)
    resumed = make_trainer(tiny_model_paths, problems, config, callbacks=[check])
    check.trainer = resumed
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # At the start of the resumed run the teacher is the saved step-2 snapshot, not the step-3 student.
    assert check.seen == (True, False, 2)
    assert resumed.teacher_refreshes == 3  # the refresh at step 4


# ---- Example ----


@pytest.mark.slow
def test_example_runs_on_the_lab_task(tmp_path):
    # The built-in run: the lab's shipped teacher, a few steps and problems (the defaults: docs/opsdc.md).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "opsdc.py"),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_steps",
        "2",
        "--num_eval_problems",
        "12",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Lab task" in result.stdout and "before OPSDC" in result.stdout and "after OPSDC" in result.stdout
    assert "level 0" in result.stdout and "level 2" in result.stdout
    metrics = json.loads((tmp_path / "run" / "opsdc_builtin_metrics.json").read_text())
    for stage in ("before", "before_with_instruction", "after"):
        measured = metrics[stage]
        assert measured["num_problems"] == 12
        # The first problems of the test split take the levels in turn: 4 per level.
        assert sorted(measured["levels"]) == ["0", "1", "2"]
        for cell in [measured, *measured["levels"].values()]:
            assert 0.0 <= cell["accuracy"] <= 1.0
            assert math.isfinite(cell["mean_completion_tokens"]) and cell["mean_completion_tokens"] > 0
        assert sum(level["num_problems"] for level in measured["levels"].values()) == 12
    # The lab's base model writes far fewer tokens under the instruction (docs/lab_task.md): the teacher's view.
    assert metrics["before_with_instruction"]["mean_completion_tokens"] < metrics["before"]["mean_completion_tokens"]
    assert metrics["settings"]["max_steps"] == 2 and metrics["settings"]["concise_instruction"] == "v2"


# ---- The teacher prompt: the instruction replaces the dataset's lead ----


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_test_opsdc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_teacher_view_diagnosis_is_rendered_from_its_measurements():
    # docs/opsdc.md's diagnosis section is benchmarks/opsdc_teacher_view.py's rendering of its committed JSON.
    view = _load_script(REPO_ROOT / "benchmarks" / "opsdc_teacher_view.py")
    results = json.loads(view.RESULTS.read_text())
    text = (REPO_ROOT / "docs" / "opsdc.md").read_text(encoding="utf-8")
    start, end = f"<!-- {view.SECTION}:start -->\n", f"<!-- {view.SECTION}:end -->"
    assert text.split(start, 1)[1].split(end, 1)[0] == view.section(results), (
        "docs/opsdc.md is out of date: run `python benchmarks/opsdc_teacher_view.py render --write docs/opsdc.md`"
    )
    # It measured the built-in run's step 0 as the example ships it...
    defaults = _load_script(REPO_ROOT / "examples" / "opsdc.py").BUILTIN_DEFAULTS
    settings = results["settings"]
    default_instruction = OPSDCConfig.__dataclass_fields__["concise_instruction"].default
    assert settings["instructions"][0] == defaults.get("concise_instruction", default_instruction)
    assert (settings["max_completion_length"], settings["seed"]) == (
        defaults["max_completion_length"], defaults["seed"])
    # ...and on what the trainer trains on: its float32 loss on the batch and the float64 rescoring agree (float32
    # forward passes carry ~1e-6 relative rounding per logit; 1e-4 relative leaves a wide margin).
    for measured in results["instructions"].values():
        assert math.isclose(measured["trainer_loss"], measured["float64_loss"], rel_tol=1e-4)


def test_teacher_prompt_options_are_validated(tmp_path):
    config = OPSDCConfig(str(tmp_path), bf16=False)
    assert (config.lead_instruction_pattern, config.teacher_prompt_template, config.loss_normalization) == (
        None, None, "rollout")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        OPSDCConfig(str(tmp_path), bf16=False, lead_instruction_pattern="(unclosed")
    with pytest.raises(ValueError, match="once each"):
        OPSDCConfig(str(tmp_path), bf16=False, teacher_prompt_template="{question}")
    with pytest.raises(ValueError, match="instruction_position='system'"):
        OPSDCConfig(str(tmp_path), bf16=False, teacher_prompt_template="{instruction} {question}",
                    instruction_position="system")
    with pytest.raises(ValueError, match="loss_normalization must be one of"):
        OPSDCConfig(str(tmp_path), bf16=False, loss_normalization="sequence")


def test_trainer_replaces_the_dapo_lead_and_logs_it(tiny_model_paths, tmp_path, hidden_state_calls):
    dataset = Dataset.from_dict({"prompt": [DAPO_PROMPT] * 4})
    trainer = make_trainer(tiny_model_paths, dataset, _config(tmp_path, max_steps=1, max_completion_length=4))
    trainer.train()
    (_, student_ids, _, keep), (_, teacher_ids, _, _) = hidden_state_calls
    tokenizer = build_tokenizer()
    for row in range(student_ids.size(0)):
        teacher_prompt = tokenizer.decode(teacher_ids[row, :-keep], skip_special_tokens=True)
        student_prompt = tokenizer.decode(student_ids[row, :-keep], skip_special_tokens=True)
        assert teacher_prompt.count(INSTRUCTION) == 1 and "step by step" not in teacher_prompt
        assert DAPO_PROBLEM in teacher_prompt and DAPO_LEAD in student_prompt
    assert trainer.state.log_history[0]["opsdc/lead_replaced"] == 1.0


# ---- Normalisation: per-rollout mean, then mean over rollouts ----


def _float64_reverse_kl(trainer, inputs):
    """Per-token KL(student || teacher) of the completion tokens, from both models' full logits in float64."""
    completion = (inputs["completion_ids"], inputs["completion_mask"])

    def logits(model, prompt_ids, prompt_mask):
        model = copy.deepcopy(trainer.accelerator.unwrap_model(model)).double().eval()
        return reference.completion_logits(model, prompt_ids, prompt_mask, *completion)

    student = logits(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"])
    teacher = logits(trainer.teacher_model, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"])
    return reference.reverse_kl(student, teacher)


def _loss_inputs(trainer, problems):
    tokenizer = build_tokenizer()
    student_ids, _, _ = trainer._tokenize_prompts(problems["prompt"][:3])
    teacher_ids, _, _ = trainer._tokenize_prompts([_add_instruction(p, INSTRUCTION) for p in problems["prompt"][:3]])

    def left_pad(rows):
        width = max(map(len, rows))
        return (torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + list(r) for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    prompt_ids, prompt_mask = left_pad(student_ids)
    teacher_prompt_ids, teacher_prompt_mask = left_pad(teacher_ids)
    # Rollouts of 8, 2 and 5 tokens: a token mean and a mean of rollout means differ.
    completion_mask = torch.tensor([[1] * 8, [1] * 2 + [0] * 6, [1] * 5 + [0] * 3])
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0)),
        "completion_mask": completion_mask,
        "teacher_prompt_ids": teacher_prompt_ids, "teacher_prompt_mask": teacher_prompt_mask,
        "opsdc_rollout_weights": torch.ones(3), "opsdc_rollout_count": torch.full((3,), 3.0),
    }


def test_rollout_and_token_normalisation_match_a_float64_reference(tiny_model_paths, problems, tmp_path):
    trainer = make_trainer(tiny_model_paths, problems, _config(tmp_path))
    with torch.no_grad():  # a teacher different from the student, so every token has a visible divergence
        for parameter in trainer.accelerator.unwrap_model(trainer.teacher_model).parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    inputs = _loss_inputs(trainer, problems)
    kl = _float64_reverse_kl(trainer, inputs)
    per_rollout = reference.rollout_mean_loss(kl, inputs["completion_mask"])
    token_mean = reference.token_mean(kl, inputs["completion_mask"])
    # The two normalisations differ by ten times the tolerance used below, so each check tells them apart.
    assert abs(per_rollout - token_mean) > 10 * 1e-4 * token_mean

    student = trainer.accelerator.unwrap_model(trainer.model)
    loss, _, n_valid = trainer._compute_loss(student, inputs, None)
    assert n_valid.item() == 15
    # float32 forward passes against float64: relative error ~1e-6 per logit; 1e-4 relative leaves a wide margin.
    torch.testing.assert_close(loss.double(), per_rollout, rtol=1e-4, atol=1e-7)

    # Accumulation: two micro-batches, each normalised by the count of the whole batch, sum to the same loss.
    halves = [{key: value[rows] for key, value in inputs.items()} for rows in (slice(0, 1), slice(1, 3))]
    accumulated = sum(trainer._compute_loss(student, half, None)[0] for half in halves)
    torch.testing.assert_close(accumulated.double(), per_rollout, rtol=1e-4, atol=1e-7)

    # The option: TRL's global token mean (its `num_items_in_batch` = the batch's tokens).
    trainer.args.loss_normalization = "token"
    token_inputs = {k: v for k, v in inputs.items() if not k.startswith("opsdc_rollout")}
    loss, _, _ = trainer._compute_loss(student, token_inputs, torch.tensor(15.0))
    torch.testing.assert_close(loss.double(), token_mean, rtol=1e-4, atol=1e-7)


def test_generation_batch_carries_the_rollout_count_of_all_accumulation_steps(tiny_model_paths, problems,
                                                                                 tmp_path):
    trainer = make_trainer(tiny_model_paths, problems, _config(tmp_path, gradient_accumulation_steps=2))
    trainer.model.train()
    output = trainer._generate_and_score_completions([dict(problems[i]) for i in range(8)])
    non_empty = (output["completion_mask"].sum(-1) > 0).float()
    assert torch.equal(output["opsdc_rollout_weights"], non_empty)
    assert output["opsdc_rollout_count"].tolist() == [non_empty.sum().item()] * 8
    trainer.args.loss_normalization = "token"
    output = trainer._generate_and_score_completions([dict(problems[i]) for i in range(8)])
    assert "opsdc_rollout_weights" not in output
