"""
ACE-GRPO: GRPO with an asymmetric, confidence-aware penalty on wrong rollouts, compared with plain GRPO.

With no arguments, trains the built-in student on two-digit addition (offline, CPU, a few minutes) with the math
reward, once with TRL's GRPO and once with ACE-GRPO, from the same start, seed and budget, and prints pass@1 … pass@16
on the test split before and after each:

```bash
python examples/ace_grpo.py
```

On real models and data, the TRL way (any `ACEGRPOConfig`, `ModelConfig` or script flag; or `--config x.yaml`). The
dataset needs a `prompt` column and, for the math reward and the evaluation, an `answer` column:

```bash
accelerate launch examples/ace_grpo.py \
    --model_name_or_path Qwen/Qwen2.5-Math-1.5B \
    --dataset_name my-org/math-prompts-with-answers \
    --ace_alpha 1.0 --loss_type dapo \
    --learning_rate 1e-6 --per_device_train_batch_size 16 --num_generations 16 --max_completion_length 4096 \
    --use_vllm --vllm_mode colocate --compare_with_grpo False \
    --num_eval_samples 32 --num_eval_problems 500 \
    --output_dir Qwen2.5-Math-1.5B-ACE-GRPO
```

The GRPO baseline is then the same command with `--ace_alpha 0` (which is exactly `GRPOTrainer`) in its own process:
two colocated vLLM engines in one process would not fit on the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoTokenizer
import trl_tip  # noqa: F401 (before TRL's PEFT helpers: trl_tip filters a bitsandbytes notice they print)
from trl import GRPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_tip import ACEGRPOConfig, ACEGRPOTrainer, PassAtKCallback, math_reward
from trl_tip.script_utils import (
    EvaluateAtTrainBegin,
    as_chat_prompts,
    end_distributed,
    parse_with_builtin_defaults,
    reset_for_another_trainer,
)
from trl_tip.vllm_cpu import platform_vllm_generation


# The built-in run: 100 steps of 8 prompts x 8 rollouts per method, about a minute and a half each on 2 CPU cores.
BUILTIN_DEFAULTS = {
    "output_dir": "outputs/ace_grpo",
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "max_steps": 100,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "dataset_test_split": "test",
}


@dataclasses.dataclass
class ACEScriptArguments(ScriptArguments):
    """
    Script arguments of the ACE-GRPO example.

    Args:
        reward_funcs (`list[str]`, *optional*):
            Dotted import paths of reward functions (e.g. `my_lib.rewards.custom_reward`); default: the math reward,
            which grades the `answer` column.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column holding the final answers (e.g. `solution`), renamed `answer`; plain-text prompts become one user
            turn so the chat template applies.
        compare_with_grpo (`bool`, *optional*, defaults to `True`):
            Also train with TRL's `GRPOTrainer` from the same start, seed and budget, and report both.
        evaluate (`bool`, *optional*, defaults to `True`):
            Measure pass@k on the test split (needs an `answer` column) before and after training.
        num_eval_samples (`int`, *optional*, defaults to `16`):
            Completions sampled per test problem; pass@k is reported for k = 1 … this number.
        num_eval_problems (`int`, *optional*):
            Evaluate on the first N test problems only (default: all).
        eval_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the evaluation.
    """

    reward_funcs: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Dotted import paths of reward functions (e.g. `my_lib.rewards.custom_reward`); default: "
            "trl_tip.math_reward, which grades the `answer` column."
        },
    )
    answer_column: str = dataclasses.field(
        default="answer",
        metadata={"help": "Column holding the final answers the math reward grades (e.g. `solution`); renamed `answer`."},
    )
    compare_with_grpo: bool = dataclasses.field(
        default=True,
        metadata={"help": "Also train with TRL's GRPOTrainer from the same start, seed and budget, and report both."},
    )
    evaluate: bool = dataclasses.field(
        default=True,
        metadata={"help": "Measure pass@k on the test split (needs an `answer` column) before and after training."},
    )
    num_eval_samples: int = dataclasses.field(
        default=16, metadata={"help": "Completions sampled per test problem; pass@k for k = 1 … this number."}
    )
    num_eval_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate on the first N test problems only (default: all)."}
    )
    eval_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "Sampling temperature of the evaluation."}
    )


def make_parser():
    return TrlParser((ACEScriptArguments, ACEGRPOConfig, ModelConfig))


def parse_arguments():
    """The TRL way (command line over `--config` YAML over defaults), with the built-in task's defaults when no model
    is given."""
    return parse_with_builtin_defaults(make_parser, BUILTIN_DEFAULTS)


def load_reward_funcs(paths: list[str] | None) -> list:
    if not paths:
        return [math_reward]
    reward_funcs = []
    for path in paths:
        if "." not in path:
            raise ValueError(f"Reward function {path!r} is not a dotted import path such as `my_lib.rewards.f`.")
        module_path, name = path.rsplit(".", 1)
        sys.path.insert(0, os.getcwd())
        reward_funcs.append(getattr(importlib.import_module(module_path), name))
    return reward_funcs


def format_table(results: dict[str, dict], ks: list[int], num_samples: int) -> str:
    header = f"{'':<10}{f'mean@{num_samples}':>8}" + "".join(f"{f'pass@{k}':>9}" for k in ks) + f"{'tokens':>8}"
    lines = [header]
    for name, result in results.items():
        row = f"{name:<10}{result['mean_accuracy']:>8.1%}" + "".join(f"{result['pass_at_k'][k]:>9.1%}" for k in ks)
        lines.append(row + f"{result['mean_completion_tokens']:>8.1f}")
    return "\n".join(lines)


def main():
    script_args, training_args, model_args, builtin = parse_arguments()
    state = PartialState()

    if builtin:
        from trl_tip.tasks import prepare_arithmetic_models

        # The partly competent student: its sampled accuracy is low, but most problems are solved by some sample, so
        # GRPO groups carry signal. (The built-in teacher solves nearly every sample and would give GRPO none.)
        prepared = prepare_arithmetic_models()
        model_args.model_name_or_path = prepared["student"]
        dataset = prepared["dataset"]
    else:
        if script_args.dataset_name is None:
            raise ValueError(
                "Set `--dataset_name` (a dataset with a `prompt` column, and `answer` for the math reward)."
            )
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        dataset = as_chat_prompts(dataset, script_args.answer_column)

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    reward_funcs = load_reward_funcs(script_args.reward_funcs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")

    test_split = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    if test_split is not None and script_args.num_eval_problems is not None:
        test_split = test_split.select(range(min(script_args.num_eval_problems, len(test_split))))
    evaluate = script_args.evaluate and test_split is not None and "answer" in test_split.column_names
    if script_args.evaluate and not evaluate:
        print(f"No `answer` column in a `{script_args.dataset_test_split}` split: skipping the pass@k evaluation.")

    def measure(trainer):
        # The trainer's own (prepared, possibly sharded) policy, evaluated on every process: each samples its share
        # of the problems, padded to equal length, since under ZeRO-3 and FSDP2 every `generate` step is a collective.
        callback = PassAtKCallback(
            trainer,
            test_split,
            num_samples=script_args.num_eval_samples,
            at_end=False,
            max_new_tokens=training_args.max_completion_length,
            temperature=script_args.eval_temperature,
            seed=training_args.seed,
            prefix="eval",
        )
        return callback.evaluate(trainer.state.global_step)

    results = {}

    runs = []
    if script_args.compare_with_grpo:
        # Same config with ACE off, trained by TRL's own GRPOTrainer: the baseline under the same budget.
        grpo_args = copy.deepcopy(training_args)
        grpo_args.ace_alpha = 0.0
        grpo_args.output_dir = f"{training_args.output_dir.rstrip('/')}-grpo-baseline"
        runs.append(("GRPO", GRPOTrainer, grpo_args))
    runs.append(("ACE-GRPO", ACEGRPOTrainer, training_args))

    for index, (name, trainer_class, args) in enumerate(runs):
        if index > 0:
            reset_for_another_trainer(args)
        # On vLLM's CPU build TRL's own GRPOTrainer needs trl_tip's weight path too (trl_tip's trainers take it alone).
        with platform_vllm_generation(args):
            trainer = trainer_class(
                model=model_args.model_name_or_path,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=dataset[script_args.dataset_train_split],
                processing_class=tokenizer,
                quantization_config=get_quantization_config(model_args),
                peft_config=get_peft_config(model_args),
            )
        before_training = None
        if evaluate and index == 0:
            # "before": the first run's policy as its training begins (prepared, before the first step).
            before_training = EvaluateAtTrainBegin(lambda trainer=trainer: measure(trainer))
            trainer.add_callback(before_training)
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint if trainer_class is ACEGRPOTrainer else None)
        if before_training is not None:
            results["before"] = before_training.result
        if trainer_class is ACEGRPOTrainer:
            trainer.save_model(args.output_dir)
            if args.push_to_hub:
                trainer.push_to_hub(dataset_name=script_args.dataset_name)
        if evaluate:
            results[name] = measure(trainer)
        del trainer

    if results and state.is_main_process:
        n = script_args.num_eval_samples
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k < n] + [n]
        if training_args.max_steps > 0:
            budget = f"{training_args.max_steps} steps"
        else:
            budget = f"{training_args.num_train_epochs} epochs"
        print(
            f"\npass@k on {results['before']['num_problems']} test problems, {n} samples each at temperature "
            f"{script_args.eval_temperature}; {budget} per method, ace_alpha="
            f"{training_args.ace_alpha}, ace_transform={training_args.ace_transform}, loss_type="
            f"{training_args.loss_type}:\n"
        )
        print(format_table(results, ks, n))
        path = Path(training_args.output_dir) / "pass_at_k.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"\nResults written to {path}.")
    state.print(f"ACE-GRPO model saved to {training_args.output_dir}.")


if __name__ == "__main__":
    main()
    end_distributed()
