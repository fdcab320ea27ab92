"""
TIP distillation: on-policy distillation on the tokens that matter.

With no arguments, distils the built-in student from the built-in teacher on two-digit addition (offline, CPU; the
times and accuracies measured are in docs/builtin_task.md, "The demo, measured") and prints the student's test accuracy
before and after:

```bash
accelerate launch examples/tip_distill.py
```

On real models and data, the TRL way (any `TipDistillConfig`, `ModelConfig` or script flag; or `--config x.yaml`):

```bash
accelerate launch examples/tip_distill.py \
    --model_name_or_path Qwen/Qwen3-4B \
    --teacher_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name open-r1/DAPO-Math-17k-Processed \
    --token_selection soft_or --token_ratio 0.5 \
    --learning_rate 1e-6 --lr_scheduler_type cosine \
    --max_completion_length 8192 --use_vllm --vllm_mode colocate \
    --output_dir Qwen3-4B-TIP
```

With the teacher served by vLLM instead of loaded in the training process (its top-k log-probs are fetched per
completion token; see docs/tip_distill.md, "A served teacher"):

```bash
trl vllm-serve --model Qwen/Qwen3-8B --port 8000 &
accelerate launch examples/tip_distill.py \
    --model_name_or_path Qwen/Qwen3-4B \
    --teacher_model_server_url http://127.0.0.1:8000 --loss_top_k 64 \
    --dataset_name open-r1/DAPO-Math-17k-Processed --output_dir Qwen3-4B-TIP
```

On the built-in task, serve its teacher (`python -m trl_tip.tasks` prints where it is) and pass only the URL:
`python examples/tip_distill.py --teacher_model_server_url http://127.0.0.1:8000`.
"""

from __future__ import annotations

import dataclasses

from datasets import load_dataset
from transformers import AutoTokenizer
import trl_tip  # noqa: F401 (before TRL's PEFT helpers: trl_tip filters a bitsandbytes notice they print)
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_tip import TipDistillConfig, TipDistillTrainer
from trl_tip.script_utils import (
    EvaluateAtTrainBegin,
    as_chat_prompts,
    end_distributed,
    evaluate_split_with_trainer,
    parse_with_builtin_defaults,
)


# The built-in run (`make demo`): 600 steps of batch 32 on the toy task; measured in docs/builtin_task.md.
BUILTIN_DEFAULTS = {
    "output_dir": "outputs/tip_distill",
    "token_selection": "soft_or",
    "token_ratio": 0.5,
    "per_device_train_batch_size": 32,
    "max_steps": 600,
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
class TipScriptArguments(ScriptArguments):
    evaluate: bool = dataclasses.field(
        default=True,
        metadata={"help": "Measure greedy accuracy on the test split (needs an `answer` column) before and after."},
    )
    num_eval_problems: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate on the first N test problems only (default: all)."}
    )
    answer_column: str = dataclasses.field(
        default="answer", metadata={"help": "Column holding the final answer used to grade evaluation (e.g. `solution`)."}
    )
    wrap_plain_prompts: bool = dataclasses.field(
        default=True,
        metadata={"help": "Turn plain-text prompts into a user message so the model's chat template applies."},
    )


def make_parser():
    return TrlParser((TipScriptArguments, TipDistillConfig, ModelConfig))


def main():
    script_args, training_args, model_args, builtin = parse_with_builtin_defaults(make_parser, BUILTIN_DEFAULTS)

    # A served teacher (`--teacher_model_server_url`) is not loaded here: the server scores the completions.
    served = training_args.teacher_model_server_url is not None
    if builtin:
        from trl_tip.tasks import prepare_arithmetic_models

        prepared = prepare_arithmetic_models()
        model_args.model_name_or_path = prepared["student"]
        if not served:
            training_args.teacher_model_name_or_path = prepared["teacher"]
        dataset = prepared["dataset"]
    else:
        if training_args.teacher_model_name_or_path is None and not served:
            raise ValueError(
                "TIP distillation needs a teacher: set `--teacher_model_name_or_path`, or "
                "`--teacher_model_server_url` for one served by `trl vllm-serve`."
            )
        if script_args.dataset_name is None:
            raise ValueError("Set `--dataset_name` (a dataset with a `prompt` column, and `answer` for evaluation).")
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        dataset = as_chat_prompts(dataset, script_args.answer_column, script_args.wrap_plain_prompts)

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    # The teacher stays unquantised unless asked for, as in TRL's distillation script.
    if not served:
        training_args.teacher_model_init_kwargs = {
            "trust_remote_code": training_args.trust_remote_code,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(training_args.teacher_model_init_kwargs or {}),
        }

    test_split = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    if test_split is not None and script_args.num_eval_problems is not None:
        test_split = test_split.select(range(min(script_args.num_eval_problems, len(test_split))))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    eval_tokens = training_args.max_completion_length or 256

    evaluate = script_args.evaluate and test_split is not None and "answer" in test_split.column_names
    trainer = TipDistillTrainer(
        model=model_args.model_name_or_path,
        teacher_model=None if served else training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
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
    if trainer.accelerator.is_main_process and after is not None:
        selection = f"{training_args.token_selection}" + (
            "" if training_args.token_selection == "all" else f", ρ={training_args.token_ratio}"
        )
        print(f"\nTIP distillation ({selection}) on {after['num_problems']} test problems:")
        print(f"  student accuracy before: {before['accuracy']:.1%}  ({before['mean_completion_tokens']:.1f} tokens)")
        print(f"  student accuracy after:  {after['accuracy']:.1%}  ({after['mean_completion_tokens']:.1f} tokens)")
        print(f"  change: {100 * (after['accuracy'] - before['accuracy']):+.1f} points")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


if __name__ == "__main__":
    main()
    end_distributed()
