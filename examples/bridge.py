"""
The sparse-to-dense bridge: reinforcement learning where exploration pays, then dense distillation down to the student.

Four stages, run in this order (any subset with `--stages`):

1. `teacher_rl`: GRPO on the teacher with the verifiable math reward (`ACEGRPOTrainer`; `--ace_alpha 0`, the default
   here, is plain GRPO, `--ace_alpha 1` adds ACE's confidence-aware penalty on wrong rollouts);
2. `warmup`: forward-KL warm-up of the student on responses the RL-improved teacher writes (`PacedTrainer` with
   `rollout_source="teacher"`, `kl_schedule="forward"`, `teacher_completions="generate"`, uniform weights);
3. `opd`: on-policy distillation, reverse KL on the student's own rollouts, from the RL-improved teacher
   (`TipDistillTrainer`, `--token_selection all` by default, any TIP rule optional);
4. `student_rl` (optional, not in the default `--stages`): GRPO on the student after the bridge.

Each stage writes its checkpoint and a `metrics.json` (test accuracy, mean@n / pass@k, timings) under
`output_dir/<stage>/`. A stage whose `metrics.json` exists is reused, not retrained (unless `--overwrite_stages`), so
rerunning the same command resumes the pipeline; an interrupted stage resumes from its last checkpoint.

With no arguments, runs on the built-in task (offline, CPU, 1-2 minutes) with the built-in teacher and student, and
prints the test accuracy after each stage:

```bash
python examples/bridge.py
python examples/bridge.py --stages teacher_rl,warmup,opd,student_rl --ace_alpha 1.0
```

On real models (every stage reads the same shared training arguments; the few that must differ per stage have
stage-prefixed versions, e.g. `--warmup_max_steps`, `--opd_learning_rate`; or `--config recipe.yaml`):

```bash
accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/bridge.py \
    --config recipes/bridge_qwen3-1.7b.yaml
accelerate launch examples/bridge.py \
    --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name open-r1/DAPO-Math-17k-Processed --dataset_config all --answer_column solution \
    --teacher_rl_max_steps 200 --warmup_max_steps 100 --opd_max_steps 300 \
    --learning_rate 1e-6 --lr_scheduler_type cosine --max_completion_length 8192 \
    --output_dir Qwen3-1.7B-bridge
```
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import time
import uuid

import torch
from trl import ModelConfig, ScriptArguments, TrlParser

from trl_tip import ACEGRPOConfig, PacedConfig, TipDistillConfig, math_reward
from trl_tip.script_utils import as_chat_prompts, end_distributed, evaluate_split, parse_with_builtin_defaults
from trl_tip.sharding import requested_sharded_engine


STAGES = ("teacher_rl", "warmup", "opd", "student_rl")
DEFAULT_STAGES = "teacher_rl,warmup,opd"
# Which model each stage trains (the other one, if any, is its teacher).
TRAINS = {"teacher_rl": "teacher", "warmup": "student", "opd": "student", "student_rl": "student"}
METRICS_FILE = "metrics.json"
INPUTS_FILE = "bridge_inputs.json"

# The built-in run: each stage short, 1-2 minutes in all on 2 CPU cores. The learning rates are far above the papers'
# 1e-6, which is meant for billion-parameter models; the tiny models need larger steps to move at all.
BUILTIN_DEFAULTS = {
    "output_dir": "outputs/bridge",
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "lr_scheduler_type": "linear",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "num_train_problems": 2000,
    "teacher_rl_max_steps": 30,
    "teacher_rl_learning_rate": 1e-5,
    "warmup_max_steps": 60,
    "warmup_learning_rate": 5e-4,
    "opd_max_steps": 150,
    "opd_learning_rate": 5e-4,
    "student_rl_max_steps": 30,
    "student_rl_learning_rate": 1e-5,
    "eval_num_samples": 4,
    "dataset_test_split": "test",
}


@dataclasses.dataclass
class BridgeScriptArguments(ScriptArguments):
    """
    The pipeline's own arguments. Every stage reads the shared training arguments (`ACEGRPOConfig`'s fields, e.g.
    `--per_device_train_batch_size`, `--temperature`, `--max_completion_length`, `--num_generations`, `--use_vllm`);
    the stage-prefixed ones below, when set, replace `--max_steps` / `--learning_rate` for that stage only.
    """

    stages: str = dataclasses.field(
        default=DEFAULT_STAGES,
        metadata={
            "help": "Comma-separated stages to run, in pipeline order whatever the order given: teacher_rl, warmup, "
            "opd, student_rl, or 'all'. A stage left out is bypassed: the next one takes the model before it."
        },
    )
    builtin_task: str = dataclasses.field(
        default="arithmetic",
        metadata={
            "help": "Built-in task used when no model is given: 'arithmetic' (two-digit addition, the fast demo) or "
            "'lab' (column addition at three carry levels, verbose solutions; set --max_completion_length 128)."
        },
    )
    overwrite_stages: bool = dataclasses.field(
        default=False,
        metadata={"help": "Retrain the selected stages even when output_dir/<stage>/metrics.json exists."},
    )
    one_stage_per_run: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Train at most one stage, then exit; rerun the same command for the next. Use it when a stage's "
            "resources (e.g. a colocated vLLM engine) are not freed within one process."
        },
    )
    teacher_model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "The teacher (RL'd in teacher_rl, distilled from in warmup and opd)."}
    )
    teacher_rl_max_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "max_steps of the teacher_rl stage (default: --max_steps)."}
    )
    teacher_rl_learning_rate: float | None = dataclasses.field(
        default=None, metadata={"help": "learning_rate of the teacher_rl stage (default: --learning_rate)."}
    )
    warmup_max_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "max_steps of the forward-KL warm-up stage (default: --max_steps)."}
    )
    warmup_learning_rate: float | None = dataclasses.field(
        default=None, metadata={"help": "learning_rate of the warm-up stage (default: --learning_rate)."}
    )
    opd_max_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "max_steps of the on-policy distillation stage (default: --max_steps)."}
    )
    opd_learning_rate: float | None = dataclasses.field(
        default=None, metadata={"help": "learning_rate of the opd stage (default: --learning_rate)."}
    )
    student_rl_max_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "max_steps of the student_rl stage (default: --max_steps)."}
    )
    student_rl_learning_rate: float | None = dataclasses.field(
        default=None, metadata={"help": "learning_rate of the student_rl stage (default: --learning_rate)."}
    )
    token_selection: str = dataclasses.field(
        default="all",
        metadata={
            "help": "TIP token selection of the opd stage: 'all' (plain OPD), 'soft_or', 'entropy_sample', ... "
            "(see TipDistillConfig)."
        },
    )
    token_ratio: float = dataclasses.field(
        default=0.5, metadata={"help": "Fraction of each rollout's tokens the opd stage keeps (not with 'all')."}
    )
    answer_column: str = dataclasses.field(
        default="answer", metadata={"help": "Dataset column with the final answers (renamed to `answer`)."}
    )
    wrap_plain_prompts: bool = dataclasses.field(
        default=True, metadata={"help": "Turn plain-text prompts into a user message so the chat template applies."}
    )
    num_train_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Train every stage on the first N problems of the train split only."}
    )
    evaluate: bool = dataclasses.field(
        default=True,
        metadata={"help": "Evaluate the initial models and each stage's model on the test split (if it has answers)."},
    )
    eval_benchmark: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Evaluate on a benchmark instead of the dataset's test split: builtin, math500, aime24, aime25 "
            "or a Hub id (see `trl-tip eval`)."
        },
    )
    num_eval_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate on the first N test problems only (default: all)."}
    )
    eval_num_samples: int = dataclasses.field(
        default=4, metadata={"help": "Completions sampled per test problem for mean@n and pass@k (0: greedy only)."}
    )
    eval_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "Sampling temperature of the mean@n / pass@k evaluation."}
    )
    eval_max_new_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "Completion budget of the evaluation (default: --max_completion_length)."}
    )
    eval_batch_size: int = dataclasses.field(
        default=256, metadata={"help": "Sequences per generate call in the evaluation."}
    )


def make_parser():
    parser = TrlParser((BridgeScriptArguments, ACEGRPOConfig, ModelConfig))
    # The bridge's first stage is GRPO; ACE's penalty is an option (--ace_alpha > 0), not the default.
    parser.set_defaults(ace_alpha=0.0)
    return parser


def parse_stages(text: str) -> list[str]:
    """The selected stages in pipeline order; `"all"` selects the four."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(STAGES)
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"--stages takes a comma-separated subset of {', '.join(STAGES)} (or 'all'), got {text!r}.")
    return [stage for stage in STAGES if stage in names]


def _command_line_values(parser, argv: list[str]) -> dict:
    # The values the dataclasses were built from, before any `__post_init__` derived others from them (the YAML file
    # and the built-in defaults are the parser's defaults by now, as in HfArgumentParser.parse_args_into_dataclasses).
    args = list(argv)
    if "--config" in args:
        index = args.index("--config")
        del args[index : index + 2]
    namespace, _ = parser.parse_known_args(args)
    return vars(namespace)


def parse_arguments(argv: list[str] | None = None):
    """
    Parse the command line (and `--config`) the TRL way, with the built-in task's defaults when no model is given.

    Returns:
        `tuple`: the script arguments, the shared `ACEGRPOConfig`, the `ModelConfig`, whether the built-in defaults
        were used, and the raw values every stage's config is built from.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = []

    def recording_parser():
        parsers.append(make_parser())
        return parsers[-1]

    saved = sys.argv
    sys.argv = [saved[0] if saved else "bridge.py", *argv]
    try:
        script_args, shared, model_args, builtin = parse_with_builtin_defaults(recording_parser, BUILTIN_DEFAULTS)
    finally:
        sys.argv = saved
    return script_args, shared, model_args, builtin, _command_line_values(parsers[-1], argv)


# ---------------------------------------------------------------------------------------------------------------------
# Stage configurations
# ---------------------------------------------------------------------------------------------------------------------


def _model_init_kwargs(model_args: ModelConfig, raw: dict) -> dict:
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": raw.get("trust_remote_code", False),
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(raw.get("model_init_kwargs") or {}),
    }


def stage_config(stage: str, raw: dict, script_args: BridgeScriptArguments, model_args: ModelConfig, output_dir: str):
    """
    The training config of `stage`: the shared arguments (`raw`) that the stage's config class has, the stage's own
    max_steps / learning_rate when set, and the settings that define the stage.

    - `teacher_rl`, `student_rl`: [`ACEGRPOConfig`] (GRPO; ACE when `ace_alpha > 0`).
    - `warmup`: [`PacedConfig`] with forward KL (`beta=0`) on completions the teacher generates, every problem
      weighted equally (`paced_alpha = paced_beta = 0`), all tokens.
    - `opd`: [`TipDistillConfig`] with reverse KL (`beta=1`) on the student's rollouts, `token_selection` from the
      script arguments.
    """
    config_class = {"teacher_rl": ACEGRPOConfig, "warmup": PacedConfig, "opd": TipDistillConfig,
                    "student_rl": ACEGRPOConfig}[stage]
    names = {field.name for field in dataclasses.fields(config_class) if field.init}
    # `beta` is GRPO's KL coefficient in the shared arguments, the divergence in the distillation configs.
    distillation = stage in ("warmup", "opd")
    shared = {key: value for key, value in raw.items() if key in names and not (key == "beta" and distillation)}
    overrides = {
        "output_dir": os.path.join(output_dir, stage),
        "model_init_kwargs": _model_init_kwargs(model_args, raw),
    }
    for name in ("max_steps", "learning_rate"):
        value = getattr(script_args, f"{stage}_{name}")
        if value is not None:
            overrides[name] = value
    if stage in ("warmup", "opd"):
        overrides["teacher_model_init_kwargs"] = {
            "trust_remote_code": raw.get("trust_remote_code", False),
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(raw.get("teacher_model_init_kwargs") or {}),
        }
    if stage == "warmup":
        overrides.update(
            beta=0.0,
            kl_schedule="forward",
            rollout_source="teacher",
            teacher_completions="generate",
            paced_alpha=0.0,
            paced_beta=0.0,
            token_selection="all",
            # Uniform weights do not read pass rates; PACED still estimates them once, so keep that to one rollout.
            pass_rate_rollouts=1,
        )
    elif stage == "opd":
        overrides.update(beta=1.0, token_selection=script_args.token_selection, token_ratio=script_args.token_ratio)
    return config_class(**{**shared, **overrides})


def stage_trainer(stage: str, args, teacher: str, student: str, train_dataset, tokenizer):
    """Build the trainer of `stage` on its config `args` (see [`stage_config`])."""
    if stage in ("teacher_rl", "student_rl"):
        from trl_tip import ACEGRPOTrainer

        return ACEGRPOTrainer(
            model=teacher if stage == "teacher_rl" else student,
            reward_funcs=[math_reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
    if stage == "warmup":
        from trl_tip import PacedTrainer

        return PacedTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            reward_funcs=[math_reward],
        )
    from trl_tip import TipDistillTrainer

    return TipDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(path: str, test_split, script_args: BridgeScriptArguments, max_new_tokens: int, seed: int):
    """Greedy accuracy, then mean@n / pass@k and mean completion tokens from `eval_num_samples` samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_tip.evaluation import evaluate_pass_at_k

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    greedy = evaluate_split(model, tokenizer, test_split, max_new_tokens, batch_size=script_args.eval_batch_size)
    result = {
        "num_problems": greedy["num_problems"],
        "greedy_accuracy": greedy["accuracy"],
        "greedy_mean_completion_tokens": greedy["mean_completion_tokens"],
    }
    if script_args.eval_num_samples > 0:
        sampled = evaluate_pass_at_k(
            model,
            tokenizer,
            test_split,
            num_samples=script_args.eval_num_samples,
            max_new_tokens=max_new_tokens,
            temperature=script_args.eval_temperature,
            batch_size=script_args.eval_batch_size,
            seed=seed,
        )
        result.update(
            num_samples=sampled["num_samples"],
            temperature=script_args.eval_temperature,
            mean_accuracy=sampled["mean_accuracy"],
            pass_at_k={str(k): value for k, value in sampled["pass_at_k"].items()},  # as JSON keys them
            mean_completion_tokens=sampled["mean_completion_tokens"],
        )
    result["seconds"] = time.perf_counter() - started
    del model
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
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
        from trl_tip.evaluation import load_benchmark

        test = load_benchmark(script_args.eval_benchmark, num_problems=script_args.num_eval_problems)
    else:
        test = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
        if test is not None and "answer" not in test.column_names:
            test = None
        if test is not None and script_args.num_eval_problems is not None:
            test = test.select(range(min(script_args.num_eval_problems, len(test))))
    return train, test


def run_bridge(
    script_args: BridgeScriptArguments, shared: ACEGRPOConfig, model_args: ModelConfig, builtin: bool, raw: dict
) -> list[dict]:
    """Run the selected stages; returns one row per evaluated model (the initial ones first), as printed."""
    from accelerate import PartialState

    from trl_tip.resume import last_complete_checkpoint

    state = PartialState()
    stages = parse_stages(script_args.stages)
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
    prepared = None
    if builtin:
        from trl_tip.tasks import prepare_arithmetic_models, prepare_lab_models

        builtin_tasks = {"arithmetic": prepare_arithmetic_models, "lab": prepare_lab_models}
        if script_args.builtin_task not in builtin_tasks:
            raise ValueError(
                f"--builtin_task must be one of {sorted(builtin_tasks)}, got {script_args.builtin_task!r}."
            )
        prepared = builtin_tasks[script_args.builtin_task](verbose=state.is_main_process)
        model_args.model_name_or_path = prepared["student"]
        script_args.teacher_model_name_or_path = prepared["teacher"]
    if script_args.teacher_model_name_or_path is None and any(s in stages for s in ("teacher_rl", "warmup", "opd")):
        raise ValueError("The bridge needs a teacher: set `--teacher_model_name_or_path`.")
    train, test = _load_data(script_args, builtin, prepared)
    output_dir = shared.output_dir
    evaluate = script_args.evaluate and test is not None
    eval_tokens = script_args.eval_max_new_tokens or shared.max_completion_length or 256
    seed = shared.seed

    rows = []
    # Where each model is now, and how the stages' records name it.
    paths = {"teacher": script_args.teacher_model_name_or_path, "student": model_args.model_name_or_path}
    refs = {role: _model_ref(path) for role, path in paths.items()}

    if evaluate:
        initial_path = os.path.join(output_dir, "initial", METRICS_FILE)
        initial = _read_json(initial_path)
        if initial is None or initial.get("inputs") != refs or script_args.overwrite_stages:
            initial = {"inputs": refs}
            if state.is_main_process:
                for role, path in paths.items():
                    if path is not None:
                        initial[role] = evaluate_checkpoint(path, test, script_args, eval_tokens, seed)
                _write_json(initial_path, initial)
            state.wait_for_everyone()
            initial = _read_json(initial_path)
        rows += [{"stage": "initial", "model": role, "test": initial[role]} for role in ("teacher", "student")
                 if role in initial]

    trained = 0
    for stage in stages:
        stage_dir = os.path.join(output_dir, stage)
        metrics_path = os.path.join(stage_dir, METRICS_FILE)
        inputs = dict(refs)
        metrics = None if script_args.overwrite_stages else _read_json(metrics_path)
        if metrics is not None and metrics["inputs"] != inputs:
            raise ValueError(
                f"{stage_dir} holds a {stage} stage trained from other models ({metrics['inputs']}) than this "
                f"pipeline gives it now ({inputs}), e.g. after a different --stages in the same output_dir. Rerun "
                "with --overwrite_stages, or choose another --output_dir."
            )
        reused = metrics is not None
        if not reused:
            if script_args.one_stage_per_run and trained == 1:
                state.print(f"Stopping before {stage} (--one_stage_per_run): rerun the same command to go on.")
                break
            resume = None
            if os.path.isdir(stage_dir) and not script_args.overwrite_stages:
                # The last checkpoint saved whole: a save cut off by the interruption leaves a partial folder.
                last, skipped = last_complete_checkpoint(stage_dir)
                for path, problem in skipped:
                    state.print(f"Skipping {path}: {problem} (a save that was cut off).")
                if last is not None and _read_json(os.path.join(stage_dir, INPUTS_FILE)) == inputs:
                    resume = last
            if resume is None and state.is_main_process and os.path.isdir(stage_dir):
                shutil.rmtree(stage_dir)  # an incomplete or overwritten stage starts from scratch
            state.wait_for_everyone()
            if state.is_main_process:
                _write_json(os.path.join(stage_dir, INPUTS_FILE), inputs)
            metrics = train_stage(stage, script_args, raw, model_args, output_dir, paths, train, resume)
            trained += 1
            if evaluate:
                if state.is_main_process:
                    metrics["test"] = evaluate_checkpoint(stage_dir, test, script_args, eval_tokens, seed)
                state.wait_for_everyone()
            if state.is_main_process:
                _write_json(metrics_path, {**metrics, "inputs": inputs})
            state.wait_for_everyone()
            metrics = _read_json(metrics_path)
        paths[TRAINS[stage]], refs[TRAINS[stage]] = stage_dir, _model_ref(stage_dir, metrics)
        rows.append({"stage": stage, "model": TRAINS[stage], "test": metrics.get("test"), "reused": reused,
                     "train_seconds": metrics["train_seconds"]})

    if state.is_main_process:
        _write_json(os.path.join(output_dir, "bridge_summary.json"), {"stages": stages, "rows": rows})
        print(format_table(rows, test_name="built-in test" if builtin and not script_args.eval_benchmark else "test"))
    return rows


def train_stage(stage, script_args, raw, model_args, output_dir, paths: dict, train, resume) -> dict:
    """
    Train one stage from the models at `paths` (`teacher`, `student`) and save its model to `output_dir/<stage>`;
    returns its metrics (without the evaluation).
    """
    from transformers import AutoTokenizer

    args = stage_config(stage, raw, script_args, model_args, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths[TRAINS[stage]], padding_side="left")
    trainer = stage_trainer(stage, args, paths["teacher"], paths["student"], train, tokenizer)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    trainer.save_model(args.output_dir)
    metrics = {
        "stage": stage,
        "run_id": uuid.uuid4().hex,
        "trains": TRAINS[stage],
        "trainer": type(trainer).__name__,
        "teacher": paths["teacher"] if stage != "student_rl" else None,
        "student": paths["student"] if stage != "teacher_rl" else None,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "train_loss": output.training_loss,
        "train_seconds": train_seconds,
        "resumed_from": resume,
        "settings": stage_settings(stage, args),
    }
    if trainer.accelerator.num_processes > 1:
        # Every process must agree on the run id that identifies this stage's checkpoint.
        from accelerate.utils import broadcast_object_list

        metrics["run_id"] = broadcast_object_list([metrics["run_id"]])[0]
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics


def stage_settings(stage: str, args) -> dict:
    """The settings that define a stage, as recorded in its metrics.json."""
    if stage in ("teacher_rl", "student_rl"):
        return {"ace_alpha": args.ace_alpha, "num_generations": args.num_generations, "kl_beta": args.beta,
                "loss_type": args.loss_type}
    if stage == "warmup":
        return {"divergence": "forward_kl", "rollouts": "teacher", "teacher_completions": args.teacher_completions,
                "paced_alpha": args.paced_alpha, "paced_beta": args.paced_beta}
    return {"divergence": "reverse_kl", "rollouts": "student", "token_selection": args.token_selection,
            "token_ratio": None if args.token_selection == "all" else args.token_ratio}


def format_table(rows: list[dict], test_name: str = "test") -> str:
    """The per-stage table the script prints."""
    sampled = next((row["test"] for row in rows if row.get("test") and "pass_at_k" in row["test"]), None)
    n = sampled["num_samples"] if sampled else None
    header = f"{'stage':<12}{'model':<9}{'greedy acc':>11}"
    if n:
        header += f"{f'mean@{n}':>9}{f'pass@{n}':>9}{'tokens':>8}"
    header += f"{'train s':>9}"
    lines = []
    for row in rows:
        test = row.get("test") or {}
        line = f"{row['stage']:<12}{row['model']:<9}"
        line += f"{100 * test['greedy_accuracy']:>10.1f}%" if test else f"{'-':>11}"
        if n:
            if "pass_at_k" in test:
                line += f"{100 * test['mean_accuracy']:>8.1f}%{100 * test['pass_at_k'][str(n)]:>8.1f}%"
                line += f"{test['mean_completion_tokens']:>8.1f}"
            else:
                line += f"{'-':>9}{'-':>9}{'-':>8}"
        seconds = row.get("train_seconds")
        line += f"{seconds:>9.0f}" if seconds is not None else f"{'':>9}"
        if row.get("reused"):
            line += "  (reused)"
        lines.append(line)
    evaluated = [row["test"] for row in rows if row.get("test")]
    if not evaluated:
        title = "\nBridge stages (not evaluated; evaluate the checkpoints with `trl-tip eval`)"
    else:
        title = f"\nBridge: accuracy on {evaluated[0]['num_problems']} {test_name} problems after each stage"
        if n:
            title += f" (greedy; mean@{n} and pass@{n} from {n} samples at T={sampled['temperature']:g})"
    return "\n".join([title + ":", header, *lines])


def main(argv: list[str] | None = None):
    script_args, shared, model_args, builtin, raw = parse_arguments(argv)
    return run_bridge(script_args, shared, model_args, builtin, raw)


if __name__ == "__main__":
    main()
    end_distributed()
