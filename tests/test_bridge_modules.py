"""
`trl_tip.bridge` module by module, without training: the arguments' precedence, the settings each stage records, the
printed table, and the checkpoint an interrupted stage resumes from.
"""

import json
from types import SimpleNamespace

import pytest

from trl_tip import bridge
from trl_tip.bridge import pipeline


# --- arguments ---------------------------------------------------------------------------------------------------


def test_raw_values_follow_command_line_over_yaml_over_builtin_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("opd_max_steps: 9\nlearning_rate: 0.003\nwarmup_learning_rate: 0.002\n")
    script_args, shared, _, builtin, raw = bridge.parse_arguments(
        ["--config", str(config), "--learning_rate", "0.004", "--output_dir", str(tmp_path)])
    assert builtin  # no model given: the built-in defaults fill what neither the file nor the command line sets
    assert (raw["opd_max_steps"], raw["learning_rate"], raw["warmup_learning_rate"]) == (9, 0.004, 0.002)
    assert (raw["teacher_rl_max_steps"], raw["num_train_problems"]) == (30, 2000)
    assert (script_args.opd_max_steps, shared.learning_rate) == (9, 0.004)
    # ACE's penalty is off unless asked for, and the raw values hold every parsed field.
    assert raw["ace_alpha"] == 0.0 and raw["output_dir"] == str(tmp_path) and "model_name_or_path" in raw


# --- stages ------------------------------------------------------------------------------------------------------


def _stage_configs(tmp_path, *extra):
    script_args, shared, model_args, _, raw = bridge.parse_arguments(["--output_dir", str(tmp_path), *extra])
    return {stage: bridge.stage_config(stage, raw, script_args, model_args, shared.output_dir)
            for stage in bridge.STAGES}


def test_recorded_settings_of_each_stage(tmp_path):
    configs = _stage_configs(tmp_path, "--token_selection", "soft_or", "--token_ratio", "0.3", "--ace_alpha", "1.0",
                             "--beta", "0.04")
    settings = {stage: bridge.stage_settings(stage, config) for stage, config in configs.items()}
    assert settings == {
        "teacher_rl": {"ace_alpha": 1.0, "num_generations": 8, "kl_beta": 0.04, "loss_type": "dapo"},
        "warmup": {"divergence": "forward_kl", "rollouts": "teacher", "teacher_completions": "generate",
                   "paced_alpha": 0.0, "paced_beta": 0.0},
        "opd": {"divergence": "reverse_kl", "rollouts": "student", "token_selection": "soft_or", "token_ratio": 0.3},
        "student_rl": {"ace_alpha": 1.0, "num_generations": 8, "kl_beta": 0.04, "loss_type": "dapo"},
    }
    # Plain OPD keeps every token: no ratio is recorded.
    plain = _stage_configs(tmp_path)["opd"]
    assert bridge.stage_settings("opd", plain)["token_ratio"] is None


def test_each_stage_has_its_config_class_and_model():
    from trl_tip import ACEGRPOConfig, PacedConfig, TipDistillConfig

    assert bridge.CONFIG_CLASSES == {"teacher_rl": ACEGRPOConfig, "warmup": PacedConfig, "opd": TipDistillConfig,
                                     "student_rl": ACEGRPOConfig}
    assert bridge.TRAINS == {"teacher_rl": "teacher", "warmup": "student", "opd": "student", "student_rl": "student"}
    assert tuple(bridge.CONFIG_CLASSES) == bridge.STAGES


# --- evaluation: the printed table ------------------------------------------------------------------------------


def _test(greedy, mean, pass_at_2, tokens):
    return {"num_problems": 20, "greedy_accuracy": greedy, "greedy_mean_completion_tokens": tokens,
            "num_samples": 2, "temperature": 1.0, "mean_accuracy": mean,
            "pass_at_k": {"1": mean, "2": pass_at_2}, "mean_completion_tokens": tokens}


def test_table_of_evaluated_reused_and_unevaluated_stages():
    rows = [
        {"stage": "initial", "model": "teacher", "test": _test(1.0, 0.75, 1.0, 25.0)},
        {"stage": "initial", "model": "student", "test": _test(0.4, 0.25, 0.5, 30.5)},
        {"stage": "opd", "model": "student", "test": _test(0.9, 0.5, 0.75, 26.0), "reused": True,
         "train_seconds": 12.4},
        {"stage": "student_rl", "model": "student", "test": None, "reused": False, "train_seconds": 3.6},
    ]
    assert bridge.format_table(rows, test_name="built-in test") == "\n".join([
        "",
        "Bridge: accuracy on 20 built-in test problems after each stage (greedy; mean@2 and pass@2 from 2 samples at "
        "T=1):",
        "stage       model     greedy acc   mean@2   pass@2  tokens  train s",
        "initial     teacher       100.0%    75.0%   100.0%    25.0         ",
        "initial     student        40.0%    25.0%    50.0%    30.5         ",
        "opd         student        90.0%    50.0%    75.0%    26.0       12  (reused)",
        "student_rl  student            -        -        -       -        4",
    ])


def test_table_without_evaluation_points_to_trl_tip_eval():
    rows = [{"stage": "teacher_rl", "model": "teacher", "test": None, "reused": False, "train_seconds": 99.5}]
    assert bridge.format_table(rows) == "\n".join([
        "",
        "Bridge stages (not evaluated; evaluate the checkpoints with `trl-tip eval`):",
        "stage       model     greedy acc  train s",
        "teacher_rl  teacher            -      100",
    ])


# --- pipeline: where an interrupted stage resumes ---------------------------------------------------------------


def _checkpoint(stage_dir, step, whole=True):
    folder = stage_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "trainer_state.json").write_text('{"global_step": %d}' % step if whole else '{"global_st')
    return folder


def _run(overwrite=False):
    printed = []
    return SimpleNamespace(script_args=SimpleNamespace(overwrite_stages=overwrite),
                           state=SimpleNamespace(print=printed.append), printed=printed)


def test_an_interrupted_stage_resumes_from_its_last_whole_checkpoint_of_the_same_inputs(tmp_path):
    stage_dir = tmp_path / "opd"
    inputs = {"teacher": {"stage": "teacher_rl", "run_id": "abc"}, "student": {"path": "student"}}
    run = _run()
    assert pipeline._resume_checkpoint(run, str(stage_dir), inputs) is None  # nothing there yet
    whole = _checkpoint(stage_dir, 2)
    cut_off = _checkpoint(stage_dir, 4, whole=False)
    (stage_dir / bridge.INPUTS_FILE).write_text(json.dumps(inputs))

    assert pipeline._resume_checkpoint(run, str(stage_dir), inputs) == str(whole)
    assert run.printed == [f"Skipping {cut_off}: its trainer_state.json is cut off (a save that was cut off)."]
    # Started from other models, or retrained on purpose: from scratch.
    other = {**inputs, "teacher": {"stage": "teacher_rl", "run_id": "def"}}
    assert pipeline._resume_checkpoint(_run(), str(stage_dir), other) is None
    assert pipeline._resume_checkpoint(_run(overwrite=True), str(stage_dir), inputs) is None


@pytest.mark.parametrize("producer, ref", [(None, {"path": "some/model"}),
                                           ({"stage": "opd", "run_id": "r1", "train_loss": 0.5},
                                            {"stage": "opd", "run_id": "r1"})])
def test_models_are_recorded_by_path_or_by_the_stage_run_that_trained_them(producer, ref):
    assert pipeline._model_ref("some/model", producer) == ref
