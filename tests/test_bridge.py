"""
`trl_tip.bridge`: the stages' configurations, stage selection and reuse, and a tiny end-to-end run (through the
package, then through `examples/bridge.py`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_tip import bridge


ROOT = Path(__file__).resolve().parents[1]


def _configs(argv, stages=("teacher_rl", "warmup", "opd", "student_rl")):
    script_args, shared, model_args, builtin, raw = bridge.parse_arguments(argv)
    configs = {stage: bridge.stage_config(stage, raw, script_args, model_args, shared.output_dir) for stage in stages}
    return script_args, shared, builtin, configs


def test_help_lists_the_pipeline_flags():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "bridge.py"), "--help"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    for flag in ("--stages", "--overwrite_stages", "--one_stage_per_run", "--teacher_model_name_or_path",
                 "--teacher_rl_max_steps", "--warmup_learning_rate", "--opd_max_steps", "--student_rl_learning_rate",
                 "--token_selection", "--ace_alpha", "--num_generations", "--model_name_or_path", "--dataset_name"):
        assert flag in result.stdout, flag


def test_each_stage_is_configured_as_the_bridge_says(tmp_path):
    from trl_tip import ACEGRPOConfig, PacedConfig, TipDistillConfig

    _, shared, builtin, configs = _configs(["--output_dir", str(tmp_path)])
    assert builtin

    teacher_rl = configs["teacher_rl"]
    assert type(teacher_rl) is ACEGRPOConfig and teacher_rl.ace_alpha == 0.0  # plain GRPO unless asked for
    assert teacher_rl.beta == 0.0 and teacher_rl.num_generations == 8
    assert (teacher_rl.max_steps, teacher_rl.learning_rate) == (30, 1e-5)

    # (2) forward KL on completions the teacher writes, every problem weighted the same, every token.
    warmup = configs["warmup"]
    assert type(warmup) is PacedConfig
    assert (warmup.beta, warmup.kl_schedule, warmup.rollout_source) == (0.0, "forward", "teacher")
    assert warmup.teacher_completions == "generate"
    assert (warmup.paced_alpha, warmup.paced_beta, warmup.token_selection) == (0.0, 0.0, "all")
    assert (warmup.max_steps, warmup.learning_rate) == (60, 5e-4)

    # (3) reverse KL on the student's own rollouts, all tokens by default.
    opd = configs["opd"]
    assert type(opd) is TipDistillConfig
    assert (opd.beta, opd.token_selection) == (1.0, "all")
    assert (opd.max_steps, opd.learning_rate) == (150, 5e-4)

    student_rl = configs["student_rl"]
    assert type(student_rl) is ACEGRPOConfig and (student_rl.max_steps, student_rl.learning_rate) == (30, 1e-5)

    for stage, config in configs.items():
        assert config.output_dir == str(tmp_path / stage)
        # The shared arguments reach every stage.
        assert (config.temperature, config.max_completion_length, config.per_device_train_batch_size) == (1.0, 32, 32)
        assert config.seed == shared.seed == 0 and config.bf16 is False


def test_shared_arguments_and_stage_prefixed_ones(tmp_path):
    _, _, builtin, configs = _configs([
        "--model_name_or_path", "student-path", "--teacher_model_name_or_path", "teacher-path",
        "--output_dir", str(tmp_path), "--max_steps", "7", "--learning_rate", "0.01", "--warmup_max_steps", "3",
        "--opd_learning_rate", "0.02", "--beta", "0.04", "--ace_alpha", "1.0", "--token_selection", "soft_or",
        "--token_ratio", "0.3", "--temperature", "0.8", "--max_completion_length", "64",
    ])
    assert not builtin
    assert {stage: (c.max_steps, c.learning_rate) for stage, c in configs.items()} == {
        "teacher_rl": (7, 0.01), "warmup": (3, 0.01), "opd": (7, 0.02), "student_rl": (7, 0.01)}
    # --beta is GRPO's KL coefficient; the distillation stages keep their divergence.
    assert (configs["teacher_rl"].beta, configs["student_rl"].beta) == (0.04, 0.04)
    assert (configs["warmup"].beta, configs["opd"].beta) == (0.0, 1.0)
    assert configs["teacher_rl"].ace_alpha == configs["student_rl"].ace_alpha == 1.0
    assert (configs["opd"].token_selection, configs["opd"].token_ratio) == ("soft_or", 0.3)
    assert configs["warmup"].token_selection == "all"
    assert all((c.temperature, c.max_completion_length) == (0.8, 64) for c in configs.values())
    assert configs["opd"].model_init_kwargs["dtype"] == "float32"


def test_recipe_reaches_every_stage(tmp_path):
    _, _, builtin, configs = _configs(["--config", str(ROOT / "recipes" / "bridge_qwen3-1.7b.yaml"), "--bf16", "false",
                                       "--output_dir", str(tmp_path)])
    assert not builtin
    assert all(c.learning_rate == 1e-6 and c.max_completion_length == 8192 for c in configs.values())
    assert configs["teacher_rl"].num_generations == 16
    assert configs["opd"].token_selection == "all"


def test_evaluation_under_a_sharded_engine_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    # As `accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml` sets it; the model paths do not
    # exist, so reaching any loader would fail with another error.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    argv = ["--model_name_or_path", str(tmp_path / "no-student"), "--teacher_model_name_or_path",
            str(tmp_path / "no-teacher"), "--dataset_name", "no/dataset", "--output_dir", str(tmp_path), "--bf16",
            "false"]
    with pytest.raises(ValueError, match="FSDP.*--evaluate false"):
        bridge.run_bridge(*bridge.parse_arguments(argv))


def test_stage_selection_is_in_pipeline_order():
    parse = bridge.parse_stages
    assert parse("opd,teacher_rl") == ["teacher_rl", "opd"]
    assert parse(" warmup , opd ") == ["warmup", "opd"]
    assert parse("all") == ["teacher_rl", "warmup", "opd", "student_rl"]
    for bad in ("", "teacher_rl,sft", "all,opd"):
        with pytest.raises(ValueError, match="comma-separated subset"):
            parse(bad)


def test_stage_trainers_get_the_models_the_pipeline_hands_them(tiny_model_paths, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_tip import ACEGRPOTrainer, PacedTrainer, TipDistillTrainer

    script_args, shared, model_args, _, raw = bridge.parse_arguments([
        "--model_name_or_path", tiny_model_paths["student"], "--teacher_model_name_or_path",
        tiny_model_paths["teacher"], "--output_dir", str(tmp_path), "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--max_completion_length", "8", "--report_to", "none", "--bf16", "false"])
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{a}+1"}] for a in range(8)],
                               "answer": [str(a + 1) for a in range(8)]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_paths["student"])
    expected = {"teacher_rl": (ACEGRPOTrainer, "teacher"), "warmup": (PacedTrainer, "student"),
                "opd": (TipDistillTrainer, "student"), "student_rl": (ACEGRPOTrainer, "student")}
    for stage, (trainer_class, trained) in expected.items():
        args = bridge.stage_config(stage, raw, script_args, model_args, shared.output_dir)
        trainer = bridge.stage_trainer(stage, args, tiny_model_paths["teacher"], tiny_model_paths["student"], train,
                                       tokenizer)
        assert type(trainer) is trainer_class and trainer.args is args
        assert trainer.model.config._name_or_path == tiny_model_paths[trained]
        if stage in ("warmup", "opd"):
            assert trainer.teacher_model.config._name_or_path == tiny_model_paths["teacher"]
        if stage == "warmup":
            assert trainer._teacher_completion_source == "generate"
        if stage in ("teacher_rl", "student_rl"):
            assert [f.__name__ for f in trainer.reward_funcs] == ["math_reward"]


def test_adapters_and_quantised_models_are_refused(tmp_path):
    parsed = bridge.parse_arguments(["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--use_peft",
                                     "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="does not train adapters or quantised models"):
        bridge.run_bridge(*parsed)


def _argv(tmp_path, stages, *extra):
    return ["--output_dir", str(tmp_path), "--stages", stages, "--num_train_problems", "64",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--teacher_rl_max_steps", "2",
            "--warmup_max_steps", "2", "--opd_max_steps", "2", "--student_rl_max_steps", "2",
            "--num_eval_problems", "20", "--eval_num_samples", "2", "--logging_steps", "1", "--disable_tqdm", "true",
            *extra]


def _run(tmp_path, stages, *extra):
    return bridge.run_bridge(*bridge.parse_arguments(_argv(tmp_path, stages, *extra)))


def _metrics(tmp_path, stage):
    return json.loads((tmp_path / stage / "metrics.json").read_text())


@pytest.mark.slow
def test_stages_resume_and_reuse(arithmetic_models, tmp_path, capsys):
    # 1. --one_stage_per_run: only the first stage trains; it leaves a checkpoint at step 2.
    rows = _run(tmp_path, "opd,teacher_rl", "--one_stage_per_run", "--save_strategy", "steps", "--save_steps", "2")
    assert [(r["stage"], r["model"]) for r in rows] == [("initial", "teacher"), ("initial", "student"),
                                                        ("teacher_rl", "teacher")]
    assert not (tmp_path / "opd").exists() and not (tmp_path / "warmup").exists()
    assert (tmp_path / "teacher_rl" / "checkpoint-2").is_dir()
    assert "Stopping before opd" in capsys.readouterr().out

    # 2. An interrupted stage (checkpoint, no metrics) resumes from its last checkpoint; then opd trains from it.
    (tmp_path / "teacher_rl" / "metrics.json").unlink()
    rows = _run(tmp_path, "teacher_rl,opd", "--save_strategy", "no")
    teacher_rl, opd = _metrics(tmp_path, "teacher_rl"), _metrics(tmp_path, "opd")
    assert teacher_rl["resumed_from"] == str(tmp_path / "teacher_rl" / "checkpoint-2")
    assert opd["trainer"] == "TipDistillTrainer" and opd["settings"]["divergence"] == "reverse_kl"
    assert opd["inputs"] == {"teacher": {"stage": "teacher_rl", "run_id": teacher_rl["run_id"]},
                             "student": {"path": arithmetic_models["student"]}}  # no warm-up in this chain
    assert opd["teacher"] == str(tmp_path / "teacher_rl")
    for stage in ("teacher_rl", "opd"):
        test = _metrics(tmp_path, stage)["test"]
        assert test["num_problems"] == 20 and test["num_samples"] == 2
        assert 0.0 <= test["greedy_accuracy"] <= 1.0 and set(test["pass_at_k"]) == {"1", "2"}
        assert (tmp_path / stage / "model.safetensors").is_file()
    table = bridge.format_table(rows)
    assert "mean@2" in table and "teacher_rl  teacher" in table and "opd         student" in table

    # 3. Completed stages are reused as they are; a new stage trains from the chain's last student.
    rows = _run(tmp_path, "teacher_rl,opd,student_rl")
    assert [r.get("reused") for r in rows[2:]] == [True, True, False]
    assert _metrics(tmp_path, "teacher_rl")["run_id"] == teacher_rl["run_id"]
    assert _metrics(tmp_path, "opd")["run_id"] == opd["run_id"]
    student_rl = _metrics(tmp_path, "student_rl")
    assert student_rl["inputs"]["student"] == {"stage": "opd", "run_id": opd["run_id"]}
    assert student_rl["trainer"] == "ACEGRPOTrainer" and student_rl["teacher"] is None

    # The example script runs the same pipeline: every stage is reused, and it prints the table of the same rows.
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "bridge.py"),
                             *_argv(tmp_path, "teacher_rl,opd,student_rl")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reused = json.loads((tmp_path / "bridge_summary.json").read_text())["rows"]
    assert [r.get("reused") for r in reused] == [None, None, True, True, True]
    assert [{**r, "reused": None} for r in reused] == [{**r, "reused": None} for r in rows]
    printed = result.stdout[result.stdout.index("\nBridge: accuracy on 20 built-in test problems"):]
    assert printed.rstrip("\n") == bridge.format_table(reused, test_name="built-in test")

    # 4. Adding the warm-up changes what opd would train from: the stale opd is refused, not reused.
    with pytest.raises(ValueError, match="trained from other models"):
        _run(tmp_path, "teacher_rl,warmup,opd")
    warmup = _metrics(tmp_path, "warmup")
    assert warmup["trainer"] == "PacedTrainer" and warmup["settings"]["rollouts"] == "teacher"
    assert warmup["inputs"]["teacher"] == {"stage": "teacher_rl", "run_id": teacher_rl["run_id"]}

    summary = json.loads((tmp_path / "bridge_summary.json").read_text())
    assert [row["stage"] for row in summary["rows"]] == ["initial", "initial", "teacher_rl", "opd", "student_rl"]
