"""
The bridge's stages: the training config of each (from the one shared set of arguments), its trainer, the settings
recorded for it, and the training of one stage from the models the pipeline hands it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import uuid

import torch
from trl import ModelConfig

from ..rewards import math_reward
from ..trainers.ace_grpo import ACEGRPOConfig, ACEGRPOTrainer
from ..trainers.paced import PacedConfig, PacedTrainer
from ..trainers.tip_distill import TipDistillConfig, TipDistillTrainer
from .arguments import BridgeScriptArguments


# Which model each stage trains (the other one, if any, is its teacher).
TRAINS = {"teacher_rl": "teacher", "warmup": "student", "opd": "student", "student_rl": "student"}
# The config class of each stage.
CONFIG_CLASSES = {"teacher_rl": ACEGRPOConfig, "warmup": PacedConfig, "opd": TipDistillConfig,
                  "student_rl": ACEGRPOConfig}


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

    Args:
        stage (`str`):
            One of [`STAGES`].
        raw (`dict`):
            The parsed values of every argument, as [`parse_arguments`] returns them.
        script_args ([`BridgeScriptArguments`]):
            The pipeline's arguments (the stage-prefixed `max_steps` / `learning_rate`, the opd token selection).
        model_args (`trl.ModelConfig`):
            Revision, attention implementation and dtype of the models the stage loads.
        output_dir (`str`):
            The pipeline's output directory; the stage writes to `output_dir/<stage>`.

    Returns:
        The stage's config: an instance of `CONFIG_CLASSES[stage]`.
    """
    config_class = CONFIG_CLASSES[stage]
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
    if distillation and raw.get("teacher_model_server_url") is not None:
        # Served: the stage loads no teacher (its path, if given, is only evaluated).
        overrides["teacher_model_name_or_path"] = None
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
    """
    Build the trainer of `stage` on its config `args` (see [`stage_config`]).

    Args:
        stage (`str`):
            One of [`STAGES`].
        args:
            The stage's config, from [`stage_config`].
        teacher (`str`), student (`str`):
            Paths of the models the stage starts from; `teacher_rl` trains the teacher, the others the student
            (`warmup` and `opd` distil it from the teacher).
        train_dataset (`datasets.Dataset`):
            Prompts (`prompt`) and final answers (`answer`).
        tokenizer:
            The tokenizer of the trained model, left-padded.

    Returns:
        [`ACEGRPOTrainer`] (`teacher_rl`, `student_rl`, rewarded by [`math_reward`]), [`PacedTrainer`] (`warmup`) or
        [`TipDistillTrainer`] (`opd`).
    """
    if getattr(args, "teacher_model_server_url", None) is not None:
        teacher = None  # served: the distillation stages load no teacher
    if stage in ("teacher_rl", "student_rl"):
        return ACEGRPOTrainer(
            model=teacher if stage == "teacher_rl" else student,
            reward_funcs=[math_reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
    if stage == "warmup":
        return PacedTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            reward_funcs=[math_reward],
        )
    return TipDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )


def train_stage(stage, script_args, raw, model_args, output_dir, paths: dict, train, resume) -> dict:
    """
    Train one stage from the models at `paths` (`teacher`, `student`) and save its model to `output_dir/<stage>`.

    Args:
        stage (`str`):
            One of [`STAGES`].
        script_args, raw, model_args, output_dir:
            As for [`stage_config`].
        paths (`dict`):
            Where the `teacher` and the `student` are now (an initial model, or an earlier stage's output).
        train (`datasets.Dataset`):
            The training split.
        resume (`str` or `None`):
            The checkpoint to resume from, or `None` to train from the start.

    Returns:
        `dict`: the stage's record without the evaluation: a fresh `run_id` (the same on every process), the trainer,
        the models it started from, `max_steps`, `learning_rate`, `train_loss`, `train_seconds`, `resumed_from` and the
        [`stage_settings`].
    """
    from transformers import AutoTokenizer

    args = stage_config(stage, raw, script_args, model_args, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths[TRAINS[stage]], padding_side="left")
    trainer = stage_trainer(stage, args, paths["teacher"], paths["student"], train, tokenizer)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    trainer.save_model(args.output_dir)
    served = getattr(args, "teacher_model_server_url", None)
    metrics = {
        "stage": stage,
        "run_id": uuid.uuid4().hex,
        "trains": TRAINS[stage],
        "trainer": type(trainer).__name__,
        "teacher": None if stage == "student_rl" else served or paths["teacher"],
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
    """
    The settings that define a stage, as recorded in its `metrics.json`.

    Args:
        stage (`str`):
            One of [`STAGES`].
        args:
            The stage's config, from [`stage_config`].

    Returns:
        `dict`: for the GRPO stages `ace_alpha`, `num_generations`, `kl_beta` and `loss_type`; for `warmup` the
        divergence (forward KL), the rollouts' source (the teacher) and the PACED weighting; for `opd` the divergence
        (reverse KL), the rollouts' source (the student) and the token selection.
    """
    if stage in ("teacher_rl", "student_rl"):
        return {"ace_alpha": args.ace_alpha, "num_generations": args.num_generations, "kl_beta": args.beta,
                "loss_type": args.loss_type}
    if stage == "warmup":
        return {"divergence": "forward_kl", "rollouts": "teacher", "teacher_completions": args.teacher_completions,
                "paced_alpha": args.paced_alpha, "paced_beta": args.paced_beta}
    return {"divergence": "reverse_kl", "rollouts": "student", "token_selection": args.token_selection,
            "token_ratio": None if args.token_selection == "all" else args.token_ratio}
