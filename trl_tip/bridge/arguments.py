"""The bridge's command line: its own arguments, the stage selection, and the parse with the built-in defaults."""

from __future__ import annotations

import dataclasses
import sys

from trl import ModelConfig, ScriptArguments, TrlParser

from ..script_utils import parse_with_builtin_defaults
from ..trainers.ace_grpo import ACEGRPOConfig


# The stages in pipeline order, and those `--stages` selects by default.
STAGES = ("teacher_rl", "warmup", "opd", "student_rl")
DEFAULT_STAGES = "teacher_rl,warmup,opd"

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
    The bridge pipeline's own arguments. Every stage reads the shared training arguments (`ACEGRPOConfig`'s fields,
    e.g. `--per_device_train_batch_size`, `--temperature`, `--max_completion_length`, `--num_generations`,
    `--use_vllm`); the stage-prefixed ones below, when set, replace `--max_steps` / `--learning_rate` for that stage
    only.
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
    teacher_model_server_url: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Base URL of a `trl vllm-serve` of the teacher: warmup and opd then distil from the server (no "
            "teacher weights in the training process; the server also writes warmup's completions). Not with the "
            "teacher_rl stage: serve the RL'd teacher and run the next stages against it."
        },
    )
    loss_top_k: int = dataclasses.field(
        default=1,
        metadata={"help": "Top tokens the teacher server returns per position (see TipDistillConfig.loss_top_k)."},
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


def make_parser() -> TrlParser:
    """
    The bridge's parser: [`BridgeScriptArguments`], the shared [`ACEGRPOConfig`] (every stage's training arguments)
    and `trl.ModelConfig`, with `--ace_alpha` defaulting to 0 (plain GRPO in the RL stages).
    """
    parser = TrlParser((BridgeScriptArguments, ACEGRPOConfig, ModelConfig))
    # The bridge's first stage is GRPO; ACE's penalty is an option (--ace_alpha > 0), not the default.
    parser.set_defaults(ace_alpha=0.0)
    return parser


def parse_stages(text: str) -> list[str]:
    """
    The stages `--stages` selects, in pipeline order whatever the order given.

    Args:
        text (`str`):
            Comma-separated stage names (spaces around them are ignored), or `"all"` for the four.

    Returns:
        `list[str]`: the selected stages, in the order of [`STAGES`].

    Raises:
        `ValueError`: when `text` names no stage, an unknown one, or `"all"` together with others.
    """
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

    Args:
        argv (`list[str]`, *optional*):
            The arguments to parse; `sys.argv[1:]` when `None`.

    Returns:
        `tuple`: the [`BridgeScriptArguments`], the shared [`ACEGRPOConfig`], the `trl.ModelConfig`, whether the
        built-in defaults were used (`bool`), and the raw values (`dict`) every stage's config is built from: the
        parsed values before any `__post_init__` derived others from them. [`run_bridge`] takes the five in this
        order.
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
