"""OPSDC (CRISP): on-policy self-distillation for concise reasoning.

The teacher is the student itself, frozen as a snapshot θ̄ and reading a conciseness instruction in place of the
dataset's own lead instruction; the student reads the prompt as it is. Both score the student's own rollouts, and the
student minimises the reverse KL KL(π_θ(·|x, y_<t) || π_θ̄(·|c ⊕ q, y_<t)), averaged over each rollout's tokens and
then over rollouts (the paper's Algorithm 1). The snapshot is hard-refreshed from the student every
`teacher_refresh_steps` optimiser steps. See https://huggingface.co/papers/2603.05433.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback
from trl import DistillationTrainer

from ..._trl_compat import divergence_loss_replaced_by, platform_vllm_generation
from ...hub import TrlTipHubMixin
from ...instructions import build_teacher_prompt, resolve_instruction
from ...losses import selective_divergence_loss
from ...quantization import keep_4bit_weights_trainable
from ...resume import ResumableTrainerMixin
from ...sharding import requested_fsdp_version
from .._inputs import (
    check_prompts,
    check_reward_columns,
    default_config,
    model_written_mask,
    reward_function_name,
)
from .._rewards import resolve_reward_funcs, reward_table
from .._teacher_prompts import TeacherSequence, pad_teacher_prompts
from .opsdc_config import OPSDCConfig
from .teacher_snapshot import TeacherSnapshotMixin, _AdapterSnapshot


logger = get_logger(__name__)


class OPSDCTrainer(
    TeacherSnapshotMixin, ResumableTrainerMixin, TrlTipHubMixin, DistillationTrainer
):
    """
    Trainer for on-policy self-distillation for concise reasoning (OPSDC, also published as CRISP), as introduced in
    [CRISP: Compressed Reasoning via Iterative Self-Policy Distillation](https://huggingface.co/papers/2603.05433).

    The student generates one completion per prompt; a frozen snapshot of the student, whose prompt carries a
    conciseness instruction in place of the dataset's lead instruction, scores the same completion tokens; the student
    minimises the reverse KL to it, each rollout's token mean averaged over the rollouts (`loss_normalization`). Only the
    prompts differ, so the teacher's sequence is its own prompt followed by the student's completion, and the two are
    compared on the completion positions. No answers are used for training.

    The snapshot is refreshed from the student at step 0 and every `args.teacher_refresh_steps` optimiser steps. With a
    PEFT (LoRA) student it is a second, frozen adapter on the same base weights, so no second copy of the base model is
    held; otherwise it is a frozen copy of the model. It is saved with each checkpoint (`opsdc_teacher.safetensors`)
    and restored on resume.

    Logged on top of [`~trl.DistillationTrainer`]'s metrics (`completions/mean_length` among them):
    `opsdc/compression` (mean completion length over its mean in the first logging window of training),
    `opsdc/teacher_refreshes` (snapshots taken so far, the one at step 0 included), `opsdc/lead_replaced` (share of
    the batch's prompts whose own lead instruction the conciseness instruction replaced) and, with `reward_funcs`,
    `rewards/<name>/mean` per function and `opsdc/accuracy` (the mean of the first one).

    Example:

    ```python
    >>> from trl_tip import OPSDCConfig, OPSDCTrainer
    >>> from trl_tip.rewards import math_reward
    >>> from datasets import load_dataset

    >>> # A "prompt" column (here conversational); the final answer, renamed "answer", only feeds math_reward.
    >>> dataset = load_dataset("trl-lib/DeepMath-103K", split="train").rename_column("solution", "answer")
    >>> trainer = OPSDCTrainer(
    ...     model="Qwen/Qwen3-1.7B",
    ...     args=OPSDCConfig(output_dir="Qwen3-1.7B-OPSDC", concise_instruction="v2"),
    ...     train_dataset=dataset,
    ...     reward_funcs=math_reward,
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to be trained, and the source of its own teacher. See [`~trl.DistillationTrainer`].
        args ([`OPSDCConfig`], *optional*):
            Configuration for this trainer. If `None`, a default one writing to `<model name>-OPSDC` (built before any
            model is loaded).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset with a `"prompt"` column, plain text or conversational. Other columns are passed to `reward_funcs`.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Dataset to use for evaluation, with the same requirements as `train_dataset`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer, padding on the left. Loaded from the model if `None`. Text-only: processors of vision-language
            models are not supported.
        reward_funcs (`Callable` or `list[Callable]`, *optional*):
            Functions with TRL's reward signature (`f(prompts, completions, completion_ids, **columns)`), such as
            [`~trl_tip.math_reward`]. They are only logged, never trained on; the first one is read as accuracy.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks added to the default ones.
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*):
            Optimizer and scheduler, `(None, None)` by default. The default AdamW only holds the trainable (student)
            parameters.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization used when loading `model` from a path, combined with `peft_config` for QLoRA.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration; the teacher then is a second adapter with the same configuration.
        tools (list of `Callable`, *optional*):
            Tools the model may call during generation. See [`~trl.DistillationTrainer`].
        teacher_model (`None`):
            Must stay `None`: the teacher is the student itself. Passing one raises an error.
    """

    _tag_names = ["trl", "trl-tip", "distillation", "opsdc"]
    _name = "OPSDC"
    _card_fields = ("concise_instruction", "instruction_position", "teacher_refresh_steps", "loss_normalization")

    def _teacher_name(self) -> str:
        # For the model card: the teacher is no separate model.
        return f"the student itself, with a conciseness instruction, refreshed every {self.args.teacher_refresh_steps} steps"
    _paper = {
        "title": "CRISP: Compressed Reasoning via Iterative Self-Policy Distillation",
        "id": "2603.05433",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{sang2026crisp,
                title        = {{CRISP: Compressed Reasoning via Iterative Self-Policy Distillation}},
                author       = {Hejian Sang and Yuanda Xu and Zhengze Zhou and Ran He and Zhipeng Wang and
                                Jiachen Sun},
                year         = 2026,
                eprint       = {arXiv:2603.05433},
            }"""),
    }

    def __init__(
        self,
        model,
        args: OPSDCConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_funcs: Callable | list[Callable] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        teacher_model=None,
    ):
        if teacher_model is not None:
            raise ValueError(
                "OPSDCTrainer got a `teacher_model`, but its teacher is a frozen snapshot of the student itself, "
                "refreshed every `teacher_refresh_steps` steps. Remove `teacher_model`, or use "
                "trl.DistillationTrainer to distil from a separate teacher."
            )
        if args is None:
            args = default_config(OPSDCConfig, model, "OPSDC")
        elif not isinstance(args, OPSDCConfig):
            raise TypeError(
                f"OPSDCTrainer needs an OPSDCConfig, got {type(args).__name__}; build one with the same fields plus "
                "the OPSDC ones (concise_instruction, instruction_position, teacher_refresh_steps)."
            )
        if requested_fsdp_version(args) == 1:
            # Before any model is loaded.
            raise ValueError(
                "OPSDCTrainer does not run on FSDP version 1: its teacher snapshot is refreshed shard by shard, which "
                "needs FSDP2's per-parameter shards (FSDP1 flattens them). Use FSDP2 (`fsdp_version: 2`, "
                "examples/accelerate_configs/fsdp2.yaml), DeepSpeed ZeRO-3 or ZeRO-2."
            )
        self.concise_instruction = resolve_instruction(args.concise_instruction)
        self.reward_funcs = resolve_reward_funcs(
            reward_funcs, trainer="OPSDCTrainer", required=False, purpose="to log accuracy (they are never trained on)"
        )
        check_prompts(train_dataset, eval_dataset)
        check_reward_columns(self.reward_funcs, train_dataset, eval_dataset)
        self._check_teacher_prompts(args, train_dataset, eval_dataset)

        with platform_vllm_generation(args):
            super().__init__(
                model=model,
                teacher_model=None,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
            )
        # Evaluation runs the student in eval mode without gradient, which would repack its 4-bit weights for good.
        keep_4bit_weights_trainable(self.model)

        if self._is_vlm:
            raise ValueError(
                "OPSDCTrainer supports text-only models: the teacher prompt is rebuilt around the instruction, which "
                "would misplace image tokens. Pass a tokenizer, not a processor."
            )
        # Sum and count of the mean completion length over the first logging window: the compression baseline.
        self._length_baseline = [0.0, 0]
        # The teacher's (input_ids, attention_mask) for the micro-batch in flight; set by `_compute_loss`.
        self._teacher_sequence: TeacherSequence | None = None
        self._start_teacher()

    def _check_teacher_prompts(self, args: OPSDCConfig, train_dataset, eval_dataset) -> None:
        """
        Fail now, not at the first generation, on prompts that cannot carry the instruction; and say how the teacher's
        prompt is built from them.
        """
        for dataset in _map_style_datasets(train_dataset, eval_dataset):
            example, replaced = build_teacher_prompt(
                dataset[0]["prompt"],
                self.concise_instruction,
                args.instruction_position,
                args.lead_instruction_pattern,
                args.teacher_prompt_template,
            )
            if replaced:
                logger.info(f"OPSDC teacher prompt: the dataset's lead instruction is replaced, e.g. {example!r}")
            else:
                logger.warning(
                    "OPSDC teacher prompt: no lead instruction recognised in the first prompt, so the conciseness "
                    "instruction is added to the whole prompt. If your prompts open with an instruction of their own, "
                    "pass its regular expression as lead_instruction_pattern so the teacher does not get both."
                )

    # ---- Generation and loss ----

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        device = output["prompt_ids"].device
        built = [
            build_teacher_prompt(
                example["prompt"],
                self.concise_instruction,
                self.args.instruction_position,
                self.args.lead_instruction_pattern,
                self.args.teacher_prompt_template,
            )
            for example in inputs
        ]
        teacher_prompts = [prompt for prompt, _ in built]
        mode = "train" if self.model.training else "eval"
        replaced = torch.tensor([float(was_replaced) for _, was_replaced in built], device=device)
        self._metrics[mode]["opsdc/lead_replaced"].append(self.accelerator.gather(replaced).mean().item())
        if self.args.loss_normalization == "rollout" and mode == "train":
            # The number of non-empty rollouts over the whole generation batch (every accumulation step, every
            # process) normalises the per-rollout means, as TRL's `num_items_in_batch` counts tokens.
            non_empty = (model_written_mask(output).sum(dim=1) > 0).float()
            output["opsdc_rollout_weights"] = non_empty
            output["opsdc_rollout_count"] = self.accelerator.gather(non_empty).sum().repeat(non_empty.shape[0])
        teacher_prompt_ids, _, _ = self._tokenize_prompts(teacher_prompts)
        teacher_prompt_ids = [torch.tensor(ids) for ids in teacher_prompt_ids]
        output.update(
            pad_teacher_prompts(teacher_prompt_ids, self._tokenizer.pad_token_id, self.pad_to_multiple_of, device)
        )
        self._log_opsdc_metrics(inputs, output)
        return output

    def _log_opsdc_metrics(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        mode = "train" if self.model.training else "eval"
        # Model-written tokens only, as `completions/mean_length` counts them.
        completion_mask = model_written_mask(output)
        mean_length = self.accelerator.gather(completion_mask.sum(dim=1)).float().mean().item()
        if mode == "train":
            if self.state.global_step < max(1, math.ceil(self.state.logging_steps or 1)):
                self._length_baseline[0] += mean_length
                self._length_baseline[1] += 1
            self._metrics[mode]["opsdc/teacher_refreshes"] = [float(self._teacher_refreshes)]
        if self._length_baseline[1] > 0:
            baseline = self._length_baseline[0] / self._length_baseline[1]
            self._metrics[mode]["opsdc/compression"].append(mean_length / baseline if baseline > 0 else math.nan)

        if not self.reward_funcs:
            return
        completion_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
        ]
        rewards = reward_table(self, self.reward_funcs, inputs, completion_ids).to(output["completion_ids"].device)
        for index, reward_func in enumerate(self.reward_funcs):
            mean_reward = torch.nanmean(self.accelerator.gather(rewards[:, index])).item()
            self._metrics[mode][f"rewards/{reward_function_name(reward_func)}/mean"].append(mean_reward)
            if index == 0:
                self._metrics[mode]["opsdc/accuracy"].append(mean_reward)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The teacher reads its own prompt (with the instruction) followed by the student's completion.
        self._teacher_sequence = TeacherSequence.of(inputs)
        per_rollout = contextlib.nullcontext()
        if "opsdc_rollout_weights" in inputs:
            # Per-process share of the global rollout count: DDP averages gradients over processes, as TRL divides
            # `num_items_in_batch` by the process count.
            per_rollout = divergence_loss_replaced_by(
                _per_rollout_mean_loss(
                    inputs["opsdc_rollout_weights"], inputs["opsdc_rollout_count"][0] / self.accelerator.num_processes
                )
            )
        try:
            with per_rollout:
                loss, entropy_sum, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_sequence = None
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The OPSDC loss is {loss.item()} at step {self.state.global_step}; no update is made with it. Lower "
                "the learning rate or train in float32/bfloat16 instead of float16."
            )
        return loss, entropy_sum, n_valid

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **multimodal_inputs):
        is_teacher = self._teacher_sequence is not None and unwrapped_model is self.accelerator.unwrap_model(
            self.teacher_model
        )
        if not is_teacher:
            return super()._get_last_hidden_state(
                unwrapped_model, input_ids, attention_mask, logits_to_keep, **multimodal_inputs
            )
        teacher = self._teacher_sequence
        if isinstance(unwrapped_model, _AdapterSnapshot):
            with unwrapped_model.active() as shared_model:
                return super()._get_last_hidden_state(
                    shared_model, teacher.input_ids, teacher.attention_mask, logits_to_keep
                )
        return super()._get_last_hidden_state(unwrapped_model, teacher.input_ids, teacher.attention_mask, logits_to_keep)


def _per_rollout_mean_loss(rollout_weights: torch.Tensor, rollout_count: torch.Tensor):
    """
    A stand-in for TRL's `_chunked_divergence_loss` (same arguments and return value) whose loss is
    `Σ_i w_i · mean_t d_{i,t} / rollout_count`: each rollout's token mean, summed over the micro-batch and divided by
    the rollout count of the whole batch, so that the accumulated gradient is that of the mean over rollouts.
    """

    def loss_fn(*args, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        if len(args) > 6:  # positional `num_items_in_batch`, TRL's 7th argument
            args = args[:6] + (None,) + args[7:]
        result = selective_divergence_loss(
            *args, method="all", rollout_weights=rollout_weights, weight_sum=rollout_count, **kwargs
        )
        return result.loss, result.entropy_sum, result.num_valid

    return loss_fn


def _map_style_datasets(*datasets) -> list:
    # The first prompt of each indexable dataset (or dict of datasets), for checks at construction.
    found = []
    for dataset in datasets:
        candidates = dataset.values() if isinstance(dataset, dict) else [dataset]
        for candidate in candidates:
            if candidate is not None and hasattr(candidate, "__getitem__") and hasattr(candidate, "__len__"):
                if len(candidate) > 0 and "prompt" in candidate[0]:
                    found.append(candidate)
    return found
