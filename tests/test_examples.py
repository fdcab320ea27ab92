import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run_example(script, *args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_tip_distill_help_lists_tip_flags():
    result = _run_example("tip_distill.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--token_selection", "--token_ratio", "--entropy_clip_quantile", "--teacher_model_name_or_path",
                 "--model_name_or_path", "--dataset_name"):
        assert flag in result.stdout, flag


@pytest.mark.slow
def test_tip_distill_runs_on_the_builtin_task(arithmetic_models, tmp_path):
    result = _run_example("tip_distill.py", "--max_steps", "40", "--output_dir", str(tmp_path / "out"),
                          "--num_eval_problems", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student accuracy before:" in result.stdout
    assert "student accuracy after:" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


def _parse(monkeypatch, argv):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tip_distill
    finally:
        sys.path.pop(0)
    from trl_tip.script_utils import parse_with_builtin_defaults

    monkeypatch.setattr(sys, "argv", ["tip_distill.py", *argv])
    return parse_with_builtin_defaults(tip_distill.make_parser, tip_distill.BUILTIN_DEFAULTS)


def test_builtin_defaults_apply_only_without_a_model(monkeypatch, tmp_path):
    script_args, training_args, model_args, builtin = _parse(monkeypatch, [])
    assert builtin and training_args.max_steps == 600 and training_args.per_device_train_batch_size == 32
    assert training_args.bf16 is False and script_args.dataset_test_split == "test"

    # Command line over YAML over the built-in defaults.
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\ntoken_ratio: 0.2\nlearning_rate: 0.01\n")
    _, training_args, _, builtin = _parse(monkeypatch, ["--config", str(config), "--learning_rate", "0.02"])
    assert builtin
    assert (training_args.max_steps, training_args.token_ratio, training_args.learning_rate) == (7, 0.2, 0.02)
    assert training_args.per_device_train_batch_size == 32

    # A real model: TRL's own defaults, untouched by the built-in ones.
    _, training_args, model_args, builtin = _parse(monkeypatch, ["--model_name_or_path", "some/model"])
    assert not builtin and model_args.model_name_or_path == "some/model"
    assert training_args.max_steps == -1 and training_args.learning_rate == 1e-6


def test_as_chat_prompts_wraps_plain_prompts_and_renames_the_answer():
    from datasets import Dataset, DatasetDict

    from trl_tip.script_utils import as_chat_prompts

    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["1+1?", "2+2?"], "solution": ["2", "4"]})})
    ready = as_chat_prompts(data, answer_column="solution")
    assert ready["train"][0]["prompt"] == [{"role": "user", "content": "1+1?"}]
    assert ready["train"]["answer"] == ["2", "4"]
    with pytest.raises(ValueError, match="no `prompt` column"):
        as_chat_prompts(Dataset.from_dict({"question": ["x"]}))
    with pytest.raises(ValueError, match="not a column"):
        as_chat_prompts(data, answer_column="gold")


def test_checkpointing_rename_warnings_are_silenced_and_nothing_else():
    import warnings

    from trl_tip.script_utils import silence_checkpointing_renames

    renames = [
        "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
        "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use `activation_checkpointing_enable` "
        "instead.",
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
        "instead.",
    ]
    others = [
        (FutureWarning, "`evaluation_strategy` is deprecated and will be removed in v6. Use `eval_strategy` instead."),
        (UserWarning, renames[1]),  # the same text in another category is not the rename notice
        (FutureWarning, "gradient_checkpointing with use_reentrant=True is slow"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_checkpointing_renames()
        for message in renames:
            warnings.warn(message, FutureWarning)
        for category, message in others:
            warnings.warn(message, category)
    assert [(w.category, str(w.message)) for w in caught] == others
