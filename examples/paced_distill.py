"""
PACED distillation: weight each problem by p(1 − p), p being the student's pass rate on it.

With no arguments, estimates the built-in student's pass rates on two-digit addition, distils it from the built-in
teacher (offline, CPU, a few minutes) and prints the pass-rate histogram, the weight distribution and the student's
test accuracy before and after:

```bash
python examples/paced_distill.py
```

On real models and data, the TRL way (any `PacedConfig`, `ModelConfig` or script flag; or `--config x.yaml`). The
dataset needs a `prompt` column (plain-text prompts become one user turn) and the answers (`--answer_column`):

```bash
accelerate launch examples/paced_distill.py \
    --model_name_or_path Qwen/Qwen3-1.7B \
    --teacher_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name open-r1/DAPO-Math-17k-Processed --dataset_config all --answer_column solution \
    --pass_rate_rollouts 8 --paced_alpha 1 --paced_beta 1 \
    --learning_rate 1e-6 --lr_scheduler_type cosine \
    --max_completion_length 8192 --use_vllm --vllm_mode colocate \
    --output_dir Qwen3-1.7B-PACED
```

Forward KL on teacher completions, then reverse KL on student rollouts: `--kl_schedule forward_then_reverse`.
Self-distillation (no teacher; a frozen copy of the student reads the reference solution, or the answer):
`--self_distillation`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from datasets import load_dataset
from transformers import AutoTokenizer
import trl_tip  # noqa: F401 (before TRL's PEFT helpers: trl_tip filters a bitsandbytes notice they print)
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_tip import PacedConfig, PacedTrainer
from trl_tip.rewards import BUILTIN_REWARDS
from trl_tip.script_utils import (
    EvaluateAtTrainBegin,
    as_chat_prompts,
    end_distributed,
    evaluate_split_with_trainer,
    parse_with_builtin_defaults,
)


# The built-in run: pass rates of 2000 problems (8 rollouts each), then 300 steps of batch 32 (1.5-3 minutes on 2
# cores: ~1.5 in docs/paced.md, ~3 measured at other times on the same, shared machine).
BUILTIN_DEFAULTS = {
    "output_dir": "outputs/paced_distill",
    "num_train_problems": 2000,
    "pass_rate_rollouts": 8,
    "per_device_train_batch_size": 32,
    "max_steps": 300,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "linear",
    "warmup_steps": 20,
    "max_completion_length": 32,
    "temperature": 1.0,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "dataset_test_split": "test",
}


@dataclasses.dataclass
class PacedScriptArguments(ScriptArguments):
    reward_funcs: list[str] = dataclasses.field(
        default_factory=lambda: ["math"],
        metadata={
            "help": "Rewards that grade rollouts into pass rates: 'math' (answer check against the `answer` column) "
            "or dotted paths to TRL-style reward functions, e.g. 'my_module.my_reward'."
        },
    )
    answer_column: str = dataclasses.field(
        default="answer", metadata={"help": "Dataset column with the ground-truth answers (renamed to `answer`)."}
    )
    num_train_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Train on the first N problems of the train split only (default: all)."}
    )
    evaluate: bool = dataclasses.field(
        default=True,
        metadata={"help": "Measure greedy accuracy on the test split (needs an `answer` column) before and after."},
    )
    num_eval_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate on the first N test problems only (default: all)."}
    )
    export_pass_rates: bool = dataclasses.field(
        default=True, metadata={"help": "Write the final pass-rate table to <output_dir>/pass_rates.jsonl."}
    )


def make_parser():
    return TrlParser((PacedScriptArguments, PacedConfig, ModelConfig))


def resolve_reward(name: str):
    if name in BUILTIN_REWARDS:
        return name
    module_name, _, function_name = name.rpartition(".")
    if not module_name:
        raise ValueError(f"Reward {name!r} is neither built in ({', '.join(BUILTIN_REWARDS)}) nor a dotted path.")
    return getattr(importlib.import_module(module_name), function_name)


def main():
    script_args, training_args, model_args, builtin = parse_with_builtin_defaults(make_parser, BUILTIN_DEFAULTS)

    if builtin:
        from trl_tip.tasks import prepare_arithmetic_models

        prepared = prepare_arithmetic_models()
        model_args.model_name_or_path = prepared["student"]
        if not training_args.self_distillation:
            training_args.teacher_model_name_or_path = prepared["teacher"]
        dataset = prepared["dataset"]
    else:
        if training_args.teacher_model_name_or_path is None and not training_args.self_distillation:
            raise ValueError("PACED needs a teacher: set `--teacher_model_name_or_path`, or `--self_distillation`.")
        if script_args.dataset_name is None:
            raise ValueError("Set `--dataset_name` (a dataset with `prompt` and `answer` columns).")
        dataset = as_chat_prompts(
            load_dataset(script_args.dataset_name, name=script_args.dataset_config), script_args.answer_column
        )

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    # The teacher stays unquantised unless asked for, as in TRL's distillation script.
    training_args.teacher_model_init_kwargs = {
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.teacher_model_init_kwargs or {}),
    }

    train_split = dataset[script_args.dataset_train_split]
    if script_args.num_train_problems is not None:
        train_split = train_split.select(range(min(script_args.num_train_problems, len(train_split))))
    test_split = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    if test_split is not None and script_args.num_eval_problems is not None:
        test_split = test_split.select(range(min(script_args.num_eval_problems, len(test_split))))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    eval_tokens = training_args.max_completion_length or 256

    evaluate = script_args.evaluate and test_split is not None and "answer" in test_split.column_names
    trainer = PacedTrainer(
        model=model_args.model_name_or_path,
        teacher_model=None if training_args.self_distillation else training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train_split,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        reward_funcs=[resolve_reward(name) for name in script_args.reward_funcs],
    )
    # Before and after: the trainer's own student, prepared as it trains (sharded under ZeRO-3 and FSDP2), evaluated on
    # every process; "before" when training begins (the resumed weights when resuming).
    before_training = EvaluateAtTrainBegin(lambda: evaluate_split_with_trainer(trainer, test_split, eval_tokens))
    if evaluate:
        trainer.add_callback(before_training)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    after = evaluate_split_with_trainer(trainer, test_split, eval_tokens) if evaluate else None
    before = before_training.result

    if trainer.accelerator.is_main_process:
        table = trainer.pass_rate_table
        rollouts, mode = training_args.pass_rate_rollouts, training_args.pass_rate_mode
        print(f"\nStudent pass rates ({rollouts} rollouts per problem, {mode}):")
        print(table.summary(training_args.paced_alpha, training_args.paced_beta))
        if script_args.export_pass_rates:
            path = os.path.join(training_args.output_dir, "pass_rates.jsonl")
            trainer.export_pass_rates(path)
            print(f"Pass-rate table written to {path}.")
    if trainer.accelerator.is_main_process and after is not None:
        beta = training_args.beta
        divergence = (f"{training_args.kl_schedule} KL" if training_args.kl_schedule else
                      {1.0: "reverse KL", 0.0: "forward KL"}.get(beta, f"JSD beta={beta:g}"))
        print(f"\nPACED distillation (alpha={training_args.paced_alpha:g}, beta={training_args.paced_beta:g}, "
              f"{divergence}) on {after['num_problems']} test problems:")
        print(f"  student accuracy before: {before['accuracy']:.1%}  ({before['mean_completion_tokens']:.1f} tokens)")
        print(f"  student accuracy after:  {after['accuracy']:.1%}  ({after['mean_completion_tokens']:.1f} tokens)")
        print(f"  change: {100 * (after['accuracy'] - before['accuracy']):+.1f} points")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


if __name__ == "__main__":
    main()
    end_distributed()
