"""
The bridge pipeline: runs the selected stages in order, each from the models the stages before it left, and records
what each stage was trained from so that a rerun reuses completed stages and resumes an interrupted one from its last
whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from trl import ModelConfig

from ..script_utils import as_chat_prompts
from ..sharding import requested_sharded_engine
from ..trainers.ace_grpo import ACEGRPOConfig
from .arguments import BridgeScriptArguments, parse_stages
from .evaluation import evaluate_checkpoint
from .stages import TRAINS, train_stage


METRICS_FILE = "metrics.json"
INPUTS_FILE = "bridge_inputs.json"
SUMMARY_FILE = "bridge_summary.json"


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(value, file, indent=2)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def _model_ref(path: str, producer: dict | None = None) -> dict:
    # What a stage records as its inputs: an initial model by its path; a model this pipeline trained by the stage and
    # run id that produced it (so the output directory can move, and a stage retrained in place invalidates what was
    # trained from it before).
    return {"path": path} if producer is None else {"stage": producer["stage"], "run_id": producer["run_id"]}


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What every stage of one pipeline run reads."""

    state: Any  # accelerate's PartialState
    script_args: BridgeScriptArguments
    raw: dict
    model_args: ModelConfig
    output_dir: str
    train: Any
    test: Any
    evaluate: bool  # evaluate the initial models and each trained stage (a test split with answers exists)
    eval_tokens: int
    seed: int

    def score(self, path: str) -> dict:
        return evaluate_checkpoint(path, self.test, self.script_args, self.eval_tokens, self.seed)


def _check_supported(script_args: BridgeScriptArguments, shared: ACEGRPOConfig, model_args: ModelConfig) -> None:
    if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "The bridge hands full checkpoints from stage to stage and does not train adapters or quantised models; "
            "run the stage scripts (examples/tip_distill.py, examples/paced_distill.py) one by one for that."
        )
    engine = requested_sharded_engine(shared)
    if script_args.evaluate and engine is not None:
        # Before any model is loaded: the bridge evaluates each stage's checkpoint on the main process alone, which
        # a sharded engine cannot load there.
        raise ValueError(
            f"The bridge's evaluation runs on the main process alone, which {engine} cannot serve. Run it with "
            "--evaluate false, or on DDP or ZeRO-2 (examples/accelerate_configs/multi_gpu.yaml, "
            "deepspeed_zero2.yaml), or evaluate the stage checkpoints afterwards with `trl-tip eval`."
        )


def _prepare_builtin(script_args: BridgeScriptArguments, model_args: ModelConfig, verbose: bool) -> dict:
    """The built-in task's teacher, student and data; the model paths of the arguments are set to them."""
    from ..tasks import prepare_arithmetic_models, prepare_lab_models

    builtin_tasks = {"arithmetic": prepare_arithmetic_models, "lab": prepare_lab_models}
    if script_args.builtin_task not in builtin_tasks:
        raise ValueError(f"--builtin_task must be one of {sorted(builtin_tasks)}, got {script_args.builtin_task!r}.")
    prepared = builtin_tasks[script_args.builtin_task](verbose=verbose)
    model_args.model_name_or_path = prepared["student"]
    script_args.teacher_model_name_or_path = prepared["teacher"]
    return prepared


def _load_data(script_args: BridgeScriptArguments, builtin: bool, prepared: dict | None):
    if builtin:
        dataset = prepared["dataset"]
    else:
        from datasets import load_dataset

        if script_args.dataset_name is None:
            raise ValueError("Set `--dataset_name` (a dataset with `prompt` and answer columns).")
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        dataset = as_chat_prompts(dataset, script_args.answer_column, script_args.wrap_plain_prompts)
    train = dataset[script_args.dataset_train_split]
    if script_args.num_train_problems is not None:
        train = train.select(range(min(script_args.num_train_problems, len(train))))
    if script_args.eval_benchmark is not None:
        from ..evaluation import load_benchmark

        test = load_benchmark(script_args.eval_benchmark, num_problems=script_args.num_eval_problems)
    else:
        test = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
        if test is not None and "answer" not in test.column_names:
            test = None
        if test is not None and script_args.num_eval_problems is not None:
            test = test.select(range(min(script_args.num_eval_problems, len(test))))
    return train, test


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def run_bridge(
    script_args: BridgeScriptArguments, shared: ACEGRPOConfig, model_args: ModelConfig, builtin: bool, raw: dict
) -> list[dict]:
    """
    Run the selected stages of the bridge, in pipeline order, each from the models the stages before it left.

    Each trained stage saves its model and a `metrics.json` under `output_dir/<stage>`; a stage whose `metrics.json`
    exists and was trained from the same models is reused (unless `--overwrite_stages`), and an interrupted one
    resumes from its last whole checkpoint. The rows are also written to `output_dir/bridge_summary.json`.

    Args:
        script_args ([`BridgeScriptArguments`]), shared ([`ACEGRPOConfig`]), model_args (`trl.ModelConfig`),
        builtin (`bool`), raw (`dict`):
            The five values [`parse_arguments`] returns, in its order.

    Returns:
        `list[dict]`: one row per model, the initial ones first (when evaluated), then one per stage run or reused:
        `stage`, `model` (`"teacher"` or `"student"`), `test` (the [`evaluate_checkpoint`] result, or `None`), and for
        the stages `reused` and `train_seconds`. [`format_table`] prints them.

    Raises:
        `ValueError`: before any model is loaded, for adapters or quantised models, for an evaluation a sharded engine
        cannot serve, for a missing teacher or dataset; and when a stored stage was trained from other models than
        the pipeline gives it now.
    """
    from accelerate import PartialState

    state = PartialState()
    stages = parse_stages(script_args.stages)
    _check_supported(script_args, shared, model_args)
    prepared = _prepare_builtin(script_args, model_args, verbose=state.is_main_process) if builtin else None
    served = script_args.teacher_model_server_url
    if served is not None and "teacher_rl" in stages:
        raise ValueError(
            f"--teacher_model_server_url={served!r} serves a fixed teacher, but the teacher_rl stage trains the "
            "teacher. Run teacher_rl first, serve its model, then run the next stages with the server's URL."
        )
    if (
        script_args.teacher_model_name_or_path is None
        and served is None
        and any(s in stages for s in ("teacher_rl", "warmup", "opd"))
    ):
        raise ValueError("The bridge needs a teacher: set `--teacher_model_name_or_path` (or a served one, "
                         "`--teacher_model_server_url`).")
    train, test = _load_data(script_args, builtin, prepared)
    run = _Run(
        state=state,
        script_args=script_args,
        raw=raw,
        model_args=model_args,
        output_dir=shared.output_dir,
        train=train,
        test=test,
        evaluate=script_args.evaluate and test is not None,
        eval_tokens=script_args.eval_max_new_tokens or shared.max_completion_length or 256,
        seed=shared.seed,
    )

    # Where each model is now, and how the stages' records name it.
    paths = {"teacher": script_args.teacher_model_name_or_path, "student": model_args.model_name_or_path}
    refs = {role: _model_ref(path) for role, path in paths.items()}
    if served is not None:
        # The stages distil from the server; the teacher's path (if given) is only evaluated.
        refs["teacher"] = {"served": served, "path": paths["teacher"]}
    rows = _evaluate_initial(run, paths, refs) if run.evaluate else []
    trained = 0
    for stage in stages:
        outcome = _run_stage(run, stage, paths, refs, trained)
        if outcome is None:
            break
        metrics, reused = outcome
        trained += not reused
        stage_dir = os.path.join(run.output_dir, stage)
        paths[TRAINS[stage]], refs[TRAINS[stage]] = stage_dir, _model_ref(stage_dir, metrics)
        rows.append({"stage": stage, "model": TRAINS[stage], "test": metrics.get("test"), "reused": reused,
                     "train_seconds": metrics["train_seconds"]})

    if state.is_main_process:
        _write_json(os.path.join(run.output_dir, SUMMARY_FILE), {"stages": stages, "rows": rows})
    return rows


def _evaluate_initial(run: _Run, paths: dict, refs: dict) -> list[dict]:
    """The initial teacher's and student's rows, evaluated once and stored in `output_dir/initial/metrics.json`."""
    initial_path = os.path.join(run.output_dir, "initial", METRICS_FILE)
    initial = _read_json(initial_path)
    if initial is None or initial.get("inputs") != refs or run.script_args.overwrite_stages:
        initial = {"inputs": refs}
        if run.state.is_main_process:
            for role, path in paths.items():
                if path is not None:
                    initial[role] = run.score(path)
            _write_json(initial_path, initial)
        run.state.wait_for_everyone()
        initial = _read_json(initial_path)
    return [{"stage": "initial", "model": role, "test": initial[role]} for role in ("teacher", "student")
            if role in initial]


def _run_stage(run: _Run, stage: str, paths: dict, refs: dict, trained: int) -> tuple[dict, bool] | None:
    """
    Reuse or train (and evaluate) one stage. Returns its record and whether it was reused, or `None` when
    `--one_stage_per_run` stops the pipeline before it.
    """
    state, script_args = run.state, run.script_args
    stage_dir = os.path.join(run.output_dir, stage)
    metrics_path = os.path.join(stage_dir, METRICS_FILE)
    inputs = dict(refs)
    metrics = None if script_args.overwrite_stages else _read_json(metrics_path)
    if metrics is not None and metrics["inputs"] != inputs:
        raise ValueError(
            f"{stage_dir} holds a {stage} stage trained from other models ({metrics['inputs']}) than this "
            f"pipeline gives it now ({inputs}), e.g. after a different --stages in the same output_dir. Rerun "
            "with --overwrite_stages, or choose another --output_dir."
        )
    if metrics is not None:
        return metrics, True
    if script_args.one_stage_per_run and trained == 1:
        state.print(f"Stopping before {stage} (--one_stage_per_run): rerun the same command to go on.")
        return None
    resume = _resume_checkpoint(run, stage_dir, inputs)
    if resume is None and state.is_main_process and os.path.isdir(stage_dir):
        shutil.rmtree(stage_dir)  # an incomplete or overwritten stage starts from scratch
    state.wait_for_everyone()
    if state.is_main_process:
        _write_json(os.path.join(stage_dir, INPUTS_FILE), inputs)
    metrics = train_stage(stage, script_args, run.raw, run.model_args, run.output_dir, paths, run.train, resume)
    if run.evaluate:
        if state.is_main_process:
            metrics["test"] = run.score(stage_dir)
        state.wait_for_everyone()
    if state.is_main_process:
        _write_json(metrics_path, {**metrics, "inputs": inputs})
    state.wait_for_everyone()
    return _read_json(metrics_path), False


def _resume_checkpoint(run: _Run, stage_dir: str, inputs: dict) -> str | None:
    """
    The checkpoint an interrupted stage resumes from: its last one saved whole, when the stage was started from the
    same models (`bridge_inputs.json`); `None` to train from scratch.
    """
    from ..resume import last_complete_checkpoint

    if not os.path.isdir(stage_dir) or run.script_args.overwrite_stages:
        return None
    # The last checkpoint saved whole: a save cut off by the interruption leaves a partial folder.
    last, skipped = last_complete_checkpoint(stage_dir)
    for path, problem in skipped:
        run.state.print(f"Skipping {path}: {problem} (a save that was cut off).")
    if last is not None and _read_json(os.path.join(stage_dir, INPUTS_FILE)) == inputs:
        return last
    return None
