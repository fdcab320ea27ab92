"""OPSDC (CRISP): on-policy self-distillation for concise reasoning.

The teacher is the student itself, frozen as a snapshot θ̄ and reading a conciseness instruction in place of the
dataset's own lead instruction; the student reads the prompt as it is. Both score the student's own rollouts, and the
student minimises the reverse KL KL(π_θ(·|x, y_<t) || π_θ̄(·|c ⊕ q, y_<t)), averaged over each rollout's tokens and
then over rollouts (the paper's Algorithm 1). The snapshot is hard-refreshed from the student every
`teacher_refresh_steps` optimiser steps. See https://huggingface.co/papers/2603.05433.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import sys
import textwrap
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import SchedulerType
from trl import DistillationConfig, DistillationTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import get_config_model_id

from .._trl_compat import divergence_loss_replaced_by, platform_vllm_generation
from ..hub import TrlTipHubMixin
from ..instructions import (
    INSTRUCTION_POSITIONS,
    build_teacher_prompt,
    check_teacher_prompt_template,
    resolve_instruction,
)
from ..losses import selective_divergence_loss
from ..quantization import keep_4bit_weights_trainable
from ..resume import ResumableTrainerMixin, atomic_path
from ..sharding import (
    copy_into_,
    full_copy,
    is_deepspeed_zero3,
    is_sharded,
    prepare_frozen_model,
    requested_fsdp_version,
)
from ._inputs import check_prompts, check_reward_columns, check_sampling, pin_memory_where_it_helps
from ._teacher_prompts import pad_teacher_prompts


logger = get_logger(__name__)

LOSS_NORMALIZATIONS = ("rollout", "token")

TEACHER_ADAPTER_NAME = "opsdc_teacher"
TEACHER_SNAPSHOT_NAME = "opsdc_teacher.safetensors"
OPSDC_STATE_NAME = "opsdc_state.json"


@dataclass
class OPSDCConfig(DistillationConfig):
    r"""
    Configuration class for the [`OPSDCTrainer`].

    Extends [`~trl.DistillationConfig`] with the parameters of on-policy self-distillation for concise reasoning. The
    teacher is the model being trained, so `teacher_model_name_or_path` and `teacher_model_init_kwargs` must stay
    unset.
    `beta` keeps its default of `1.0` (reverse KL): forward KL collapses in this setting.

    Parameters:
        > Parameters that control the teacher

        concise_instruction (`str`, *optional*, defaults to `"v2"`):
            Instruction the teacher reads with each problem: a key of [`CONCISE_INSTRUCTIONS`] (`"v1"` uniform,
            `"v2"` difficulty-aware) or a custom instruction text. A value without whitespace is read as a key, so a
            mistyped key fails instead of becoming the instruction.
        instruction_position (`str`, *optional*, defaults to `"before"`):
            Where the teacher's prompt carries the instruction: `"before"` the problem in the last user turn (the
            paper's layout), `"after"` it, or in the `"system"` turn (conversational prompts only).
        lead_instruction_pattern (`str` or `None`, *optional*, defaults to `None`):
            Regular expression of the dataset's own lead instruction at the start of the prompt (its last user
            turn). The teacher's prompt drops it: the conciseness instruction takes its place, as in the paper.
            `None` recognises DAPO-Math-17k's "Solve the following math problem step by step." (its answer-format
            sentence is kept, as in the authors' teacher prompt). Prompts it does not match get the instruction added
            to the whole prompt; `opsdc/lead_replaced` logs the share of prompts whose lead was replaced.
        teacher_prompt_template (`str` or `None`, *optional*, defaults to `None`):
            Layout of the teacher's prompt text with the fields `{instruction}` and `{question}` (the prompt without
            its recognised lead). `None`: `"{instruction}\n\n{question}"` for `instruction_position="before"`,
            the reverse for `"after"`. Not combinable with `"system"`.
        loss_normalization (`str`, *optional*, defaults to `"rollout"`):
            `"rollout"`: each rollout's reverse KL is averaged over its tokens, then the rollouts are averaged (the
            paper's Algorithm 1 divides by |y_i|), over the whole batch of every accumulation step and process.
            `"token"`: TRL's global token mean, which gives long rollouts more weight.
        teacher_refresh_steps (`int`, *optional*, defaults to `50`):
            M: the teacher snapshot is hard-copied from the student at step 0 and every M optimiser steps. M = 1 is a
            live teacher and collapses; a very large M is a frozen teacher and compresses little.

    > [!NOTE]
    > These parameters have default values different from [`~trl.DistillationConfig`], following the paper:
    > - `lr_scheduler_type`: Defaults to `"constant"` instead of `"linear"`.
    > - `weight_decay`: Defaults to `0.01` instead of `0.0`.
    """

    # Parameters whose default values are overridden from DistillationConfig, to the paper's settings
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={"help": "The scheduler type to use. OPSDC trains with a constant learning rate."},
    )
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "Weight decay for AdamW if we apply some."},
    )

    # Parameters that control the teacher
    concise_instruction: str = field(
        default="v2",
        metadata={
            "help": "Instruction the teacher reads with each problem: 'v1' (uniform), 'v2' (difficulty-aware) or a "
            "custom instruction text. A value without whitespace is read as a key."
        },
    )
    instruction_position: str = field(
        default="before",
        metadata={
            "help": "Where the teacher's prompt carries the instruction: 'before' the problem in the last user turn, "
            "'after' it, or in the 'system' turn (conversational prompts only).",
            "choices": list(INSTRUCTION_POSITIONS),
        },
    )
    lead_instruction_pattern: str | None = field(
        default=None,
        metadata={
            "help": "Regular expression of the dataset's own lead instruction at the start of the prompt; the teacher's "
            "prompt has the conciseness instruction in its place. None recognises DAPO-Math-17k's 'Solve the "
            "following math problem step by step.'. Without a match the instruction is added to the whole prompt."
        },
    )
    teacher_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Layout of the teacher's prompt text with the fields {instruction} and {question} (the prompt "
            "without its recognised lead). None: instruction, a blank line, question (or the reverse for "
            "instruction_position='after')."
        },
    )
    loss_normalization: str = field(
        default="rollout",
        metadata={
            "help": "'rollout': mean over each rollout's tokens, then mean over the rollouts of the whole batch (the "
            "paper's Algorithm 1); 'token': TRL's global token mean, which weighs long rollouts more.",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    teacher_refresh_steps: int = field(
        default=50,
        metadata={
            "help": "Hard-copy the student into the teacher snapshot at step 0 and every this many optimiser steps "
            "(M >= 1). M = 1 collapses; a very large M compresses little."
        },
    )

    def __post_init__(self):
        # Checked before the parent's own validation, so these mistakes are reported whatever the hardware.
        resolve_instruction(self.concise_instruction)
        if self.instruction_position not in INSTRUCTION_POSITIONS:
            raise ValueError(
                f"instruction_position must be one of {INSTRUCTION_POSITIONS}, got {self.instruction_position!r}."
            )
        if self.lead_instruction_pattern is not None:
            import re

            try:
                re.compile(self.lead_instruction_pattern)
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"lead_instruction_pattern {self.lead_instruction_pattern!r} is not a valid regular expression: "
                    f"{error}."
                ) from None
        if self.teacher_prompt_template is not None:
            check_teacher_prompt_template(self.teacher_prompt_template)
            if self.instruction_position == "system":
                raise ValueError(
                    "teacher_prompt_template lays out the instruction and the question in the user turn; it cannot be "
                    "combined with instruction_position='system'."
                )
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}."
            )
        if (
            isinstance(self.teacher_refresh_steps, bool)
            or not isinstance(self.teacher_refresh_steps, int)
            or self.teacher_refresh_steps < 1
        ):
            raise ValueError(
                f"teacher_refresh_steps must be an integer >= 1 (the teacher is refreshed every that many optimiser "
                f"steps), got {self.teacher_refresh_steps!r}. The paper uses 50."
            )
        if self.teacher_model_name_or_path is not None or self.teacher_model_init_kwargs is not None:
            raise ValueError(
                "OPSDCConfig got a teacher model (teacher_model_name_or_path / teacher_model_init_kwargs), but the "
                "OPSDC teacher is a frozen snapshot of the student itself. Remove these fields, or use "
                "trl.DistillationTrainer to distil from a separate teacher."
            )
        super().__post_init__()
        check_sampling(self.temperature, self.generation_kwargs)
        pin_memory_where_it_helps(self)
        if self.beta == 0.0:
            warnings.warn(
                "OPSDCConfig(beta=0.0) trains with forward KL, which collapses in self-distillation for conciseness; "
                "the paper uses reverse KL (beta=1.0, the default).",
                UserWarning,
                stacklevel=2,
            )

    @property
    def concise_instruction_text(self) -> str:
        """The instruction text the teacher reads (`concise_instruction` resolved)."""
        return resolve_instruction(self.concise_instruction)


def adapter_snapshot_pairs(
    peft_model: nn.Module, source_adapter: str, target_adapter: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """
    Match every parameter of PEFT adapter `target_adapter` with the parameter of `source_adapter` at the same place.

    PEFT names adapter weights with the adapter name as one segment (`...q_proj.lora_A.default.weight`,
    `...modules_to_save.default.weight`), so the counterpart is found by swapping that segment.

    Returns:
        `list[tuple[str, torch.Tensor, torch.Tensor]]`: `(target name, target parameter, source parameter)`.
    """
    parameters = dict(peft_model.named_parameters())
    target_marker, source_marker = f".{target_adapter}.", f".{source_adapter}."
    pairs = []
    for name, target in parameters.items():
        if target_marker not in name:
            continue
        source_name = name.replace(target_marker, source_marker)
        if source_name not in parameters:
            raise RuntimeError(f"Adapter weight {name!r} has no counterpart {source_name!r} in the model.")
        pairs.append((name, target, parameters[source_name]))
    if not pairs:
        raise RuntimeError(f"The model holds no weights of adapter {target_adapter!r}.")
    return pairs


def module_snapshot_pairs(target: nn.Module, source: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """
    Match every parameter and buffer of `target` with the one of the same name in `source` (a copy of the same model).

    Returns:
        `list[tuple[str, torch.Tensor, torch.Tensor]]`: `(name, target tensor, source tensor)`.
    """
    target_tensors = dict(itertools.chain(target.named_parameters(), target.named_buffers()))
    source_tensors = dict(itertools.chain(source.named_parameters(), source.named_buffers()))
    if target_tensors.keys() != source_tensors.keys():
        missing = sorted(source_tensors.keys() - target_tensors.keys())[:5]
        extra = sorted(target_tensors.keys() - source_tensors.keys())[:5]
        raise RuntimeError(f"The teacher copy no longer matches the student (missing {missing}, extra {extra}).")
    return [(name, tensor, source_tensors[name]) for name, tensor in target_tensors.items()]


@torch.no_grad()
def copy_snapshot_(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """Copy each source tensor into its target, in place (a hard refresh θ̄ ← θ)."""
    for name, target, source in pairs:
        # `ds_shape`: a ZeRO-3 parameter's own shape is that of its (empty) gathered placeholder.
        target_shape = getattr(target, "ds_shape", target.shape)
        source_shape = getattr(source, "ds_shape", source.shape)
        if target_shape != source_shape:
            raise RuntimeError(f"Cannot refresh {name!r}: shape {tuple(target_shape)} vs {tuple(source_shape)}.")
        # Each rank copies its own shards when both are sharded (ZeRO-3, FSDP2): no gather, no full copy anywhere.
        copy_into_(target, source, name)


def _bnb_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit linear layers of `model` (none when bitsandbytes was never imported)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    linear_4bit = getattr(bnb_nn, "Linear4bit", None)
    if linear_4bit is None:
        return []
    return [module for module in model.modules() if isinstance(module, linear_4bit)]


class _AdapterSnapshot(nn.Module):
    """
    The teacher of a PEFT student: a frozen adapter on the student's own base model, seen by TRL as a model.

    It owns no parameters. The base model and both adapters belong to the student, and are kept out of this module's
    children so that nothing done to the teacher (`eval()`, device moves, parameter counts) reaches the student.
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str):
        super().__init__()
        self.__dict__["peft_model"] = peft_model
        self.__dict__["quantized_layers"] = _bnb_4bit_layers(peft_model)
        self.adapter_name = adapter_name

    @property
    def config(self):
        return self.peft_model.config

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    @contextlib.contextmanager
    def active(self):
        """Run the shared model as the teacher (snapshot adapter active, frozen, no dropout), then restore it."""
        model = self.peft_model
        previous_adapter, was_training = model.active_adapter, model.training
        model.set_adapter(self.adapter_name, inference_mode=True)
        model.eval()
        # The 4-bit base layers are the student's too: they stay in training mode. In eval mode, on a CPU with
        # AVX512-BF16, bitsandbytes takes a no-grad forward for inference and repacks the weights in place into a
        # layout whose kernel has no backward, so the student's next forward with gradients (the checkpointed
        # recomputation in this step's backward, or the next step) fails. Their mode selects a kernel only (they have
        # no dropout), and in training mode the teacher computes with the same kernel as the student.
        for layer in self.quantized_layers:
            layer.train()
        try:
            yield model
        finally:
            # `set_adapter` makes the restored adapter trainable again and freezes every other one.
            model.set_adapter(previous_adapter)
            model.train(was_training)


class _TeacherRefreshCallback(TrainerCallback):
    """Refreshes the teacher right after every `teacher_refresh_steps`-th optimiser step, before any checkpoint."""

    def __init__(self, trainer: OPSDCTrainer):
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and state.global_step % args.teacher_refresh_steps == 0:
            trainer.refresh_teacher()


class OPSDCTrainer(ResumableTrainerMixin, TrlTipHubMixin, DistillationTrainer):
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
            Configuration for this trainer. If `None`, a default configuration is used.
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
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = OPSDCConfig(f"{model_name.split('/')[-1]}-OPSDC")
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
        self.reward_funcs = _as_reward_funcs(reward_funcs)
        check_prompts(train_dataset, eval_dataset)
        check_reward_columns(self.reward_funcs, train_dataset, eval_dataset)
        for dataset in _map_style_datasets(train_dataset, eval_dataset):
            # Fails now, not at the first generation, on prompts that cannot carry the instruction; and says how the
            # teacher's prompt is built from them.
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
        self._student_adapter_name: str | None = None
        self._teacher_refreshes = 0
        self._teacher_refreshed_at_step: int | None = None
        # Sum and count of the mean completion length over the first logging window: the compression baseline.
        self._length_baseline = [0.0, 0]
        # The teacher's (input_ids, attention_mask) for the micro-batch in flight; set by `_compute_loss`.
        self._teacher_sequence: tuple[torch.Tensor, torch.Tensor] | None = None
        self.teacher_model = self._create_teacher()
        if isinstance(self.teacher_model, _AdapterSnapshot):
            self.refresh_teacher()
        else:
            # A full copy is built equal to the student (under FSDP2 from rank 0's weights, which the student's own
            # sharding broadcasts too): it is the snapshot of step 0.
            self._record_refresh()
        # First in line, so that every other callback's `on_step_end` (logging, checkpoints, the user's) sees the
        # teacher of the step that just ended.
        self.callback_handler.callbacks.insert(0, _TeacherRefreshCallback(self))

    # ---- Teacher snapshot ----

    def _create_teacher(self) -> nn.Module:
        student = self.accelerator.unwrap_model(self.model)
        if is_peft_model(student):
            active_adapters = student.active_adapters
            if len(active_adapters) != 1:
                raise ValueError(f"OPSDCTrainer needs exactly one active adapter, got {active_adapters}.")
            self._student_adapter_name = active_adapters[0]
            if TEACHER_ADAPTER_NAME in student.peft_config:
                raise ValueError(
                    f"The model already has an adapter named {TEACHER_ADAPTER_NAME!r}, which OPSDCTrainer reserves "
                    "for the teacher snapshot. Pass a model without it."
                )
            if hasattr(student.get_output_embeddings(), "modules_to_save"):
                raise ValueError(
                    "The PEFT config trains `lm_head` (modules_to_save), but the distillation loss reads the output "
                    "head outside the adapter switch, so the teacher would score with the student's head. Remove "
                    "`lm_head` from `modules_to_save`."
                )
            student.add_adapter(TEACHER_ADAPTER_NAME, copy.deepcopy(student.peft_config[self._student_adapter_name]))
            for _, teacher_weight, student_weight in adapter_snapshot_pairs(
                student, self._student_adapter_name, TEACHER_ADAPTER_NAME
            ):
                # PEFT may create the new adapter in float32 next to a bfloat16 student adapter (QLoRA): match it, so
                # a refreshed teacher computes exactly what the student did.
                teacher_weight.data = teacher_weight.data.to(student_weight.dtype)
                teacher_weight.requires_grad_(False)
            return _AdapterSnapshot(student, TEACHER_ADAPTER_NAME)

        if is_deepspeed_zero3(self.accelerator) and any(hasattr(p, "ds_id") for p in student.parameters()):
            # Loaded partitioned (`zero.Init`): a deep copy would copy empty partitions. The same architecture built
            # partitioned the same way holds the same slices on every rank; copying them is the snapshot. Done
            # before the engine starts, which gathers the persistent parameters from these partitions.
            # Its random initialisation (overwritten at once) must not advance the generator that generation samples
            # from, so that ZeRO-3 runs sample what DDP runs do.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                teacher = type(student)._from_config(student.config, dtype=next(student.parameters()).dtype)
            teacher.requires_grad_(False)
            copy_snapshot_(module_snapshot_pairs(teacher, student))
        else:
            teacher = copy.deepcopy(student)
            teacher.requires_grad_(False)
        teacher.eval()
        # Sharded like the student: partitioned under ZeRO-3, `fully_shard`-ed per block under FSDP2.
        return prepare_frozen_model(teacher, self.accelerator)

    def _snapshot_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        if isinstance(self.teacher_model, _AdapterSnapshot):
            return adapter_snapshot_pairs(
                self.teacher_model.peft_model, self._student_adapter_name, self.teacher_model.adapter_name
            )
        return module_snapshot_pairs(
            self.accelerator.unwrap_model(self.teacher_model), self.accelerator.unwrap_model(self.model)
        )

    @property
    def teacher_refreshes(self) -> int:
        """Number of snapshots taken so far, including the one at step 0."""
        return self._teacher_refreshes

    def refresh_teacher(self) -> None:
        """Hard-copy the student's current weights into the teacher snapshot (θ̄ ← θ)."""
        copy_snapshot_(self._snapshot_pairs())
        self._record_refresh()

    def _record_refresh(self) -> None:
        self._teacher_refreshes += 1
        self._teacher_refreshed_at_step = self.state.global_step
        self._metrics["train"]["opsdc/teacher_refreshes"] = [float(self._teacher_refreshes)]

    def save_teacher_snapshot(self, directory: str) -> None:
        """
        Write the teacher snapshot and the OPSDC bookkeeping (refresh count, length baseline) to `directory`.

        Under ZeRO-3 or FSDP2 every rank must call it: the snapshot is gathered one tensor at a time, and the main
        process writes it.
        """
        tensors = {}
        for name, teacher, _ in self._snapshot_pairs():
            full = full_copy(teacher)
            if self.args.should_save:
                tensors[name] = full.cpu().contiguous()
        if not self.args.should_save:
            return
        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, TEACHER_SNAPSHOT_NAME)) as temporary:
            save_file(tensors, temporary, metadata={"format": "pt"})
        state = {
            "teacher_refreshes": self._teacher_refreshes,
            "teacher_refreshed_at_step": self._teacher_refreshed_at_step,
            "teacher_refresh_steps": self.args.teacher_refresh_steps,
            "length_baseline_sum": self._length_baseline[0],
            "length_baseline_count": self._length_baseline[1],
        }
        with atomic_path(os.path.join(directory, OPSDC_STATE_NAME)) as temporary, open(temporary, "w") as file:
            json.dump(state, file, indent=2)

    def load_teacher_snapshot(self, directory: str) -> None:
        """Restore what [`save_teacher_snapshot`] wrote, so training continues with the same teacher."""
        snapshot_path = os.path.join(directory, TEACHER_SNAPSHOT_NAME)
        if not os.path.isfile(snapshot_path):
            logger.warning(
                f"{directory} holds no OPSDC teacher snapshot ({TEACHER_SNAPSHOT_NAME}); the teacher restarts as a "
                "copy of the resumed student."
            )
            self.refresh_teacher()
            return
        saved = load_file(snapshot_path)
        pairs = self._snapshot_pairs()
        expected = {name for name, _, _ in pairs}
        if saved.keys() != expected:
            missing, unexpected = sorted(expected - saved.keys())[:5], sorted(saved.keys() - expected)[:5]
            raise ValueError(
                f"The teacher snapshot in {directory} does not match this model (missing {missing}, unexpected "
                f"{unexpected}); resume with the model and PEFT config the checkpoint was trained with."
            )
        with torch.no_grad():
            for name, teacher, _ in pairs:
                copy_into_(teacher, saved[name], name)
        state_path = os.path.join(directory, OPSDC_STATE_NAME)
        if os.path.isfile(state_path):
            with open(state_path) as file:
                state = json.load(file)
            self._teacher_refreshes = state["teacher_refreshes"]
            self._teacher_refreshed_at_step = state["teacher_refreshed_at_step"]
            self._length_baseline = [state["length_baseline_sum"], state["length_baseline_count"]]

    # ---- Checkpoints ----

    def _save_optimizer_and_scheduler(self, output_dir):
        # Every process comes through here (a sharded snapshot is gathered by all of them), within the checkpoint's
        # save and before transformers writes the trainer state that marks the checkpoint complete.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save or is_sharded(self.accelerator):
            self.save_teacher_snapshot(output_dir)

    def _checkpoint_files(self) -> list[str]:
        if self.args.save_only_model:  # saved with the optimizer, which a model-only checkpoint does not save
            return super()._checkpoint_files()
        return [*super()._checkpoint_files(), TEACHER_SNAPSHOT_NAME, OPSDC_STATE_NAME]

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every resume path (DeepSpeed included, which skips `_load_from_checkpoint`) comes through here, after the
        # student's weights are loaded.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_teacher_snapshot(checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        if self._student_adapter_name is None:
            return super()._save(output_dir, state_dict)
        # `PeftModel.save_pretrained` writes every adapter the model holds; the saved model is the student's adapter
        # only (checkpoints get the teacher separately, see `_save_optimizer_and_scheduler`).
        peft_model = self.accelerator.unwrap_model(self.model)
        save_pretrained = peft_model.save_pretrained

        def save_student_adapter(*args, **kwargs):
            kwargs.setdefault("selected_adapters", [self._student_adapter_name])
            return save_pretrained(*args, **kwargs)

        peft_model.save_pretrained = save_student_adapter
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del peft_model.save_pretrained

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
            loss_mask = output["completion_mask"]
            if "tool_mask" in output:
                loss_mask = loss_mask * output["tool_mask"]
            non_empty = (loss_mask.sum(dim=1) > 0).float()
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
        completion_mask = output["completion_mask"]
        if "tool_mask" in output:  # count model-written tokens only, as `completions/mean_length` does
            completion_mask = completion_mask * output["tool_mask"]
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
        device = output["completion_ids"].device
        completion_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
        ]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        completions = texts
        if is_conversational(inputs[0]):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        # Every other dataset column reaches the reward functions as a keyword argument, as in TRL's GRPO.
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion")}
        for index, reward_func in enumerate(self.reward_funcs):
            rewards = reward_func(
                prompts=[example["prompt"] for example in inputs],
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=self.state,
                **columns,
            )
            rewards = torch.tensor([math.nan if r is None else float(r) for r in rewards], device=device)
            mean_reward = torch.nanmean(self.accelerator.gather(rewards)).item()
            self._metrics[mode][f"rewards/{_reward_func_name(reward_func)}/mean"].append(mean_reward)
            if index == 0:
                self._metrics[mode]["opsdc/accuracy"].append(mean_reward)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The teacher reads its own prompt followed by the student's completion. Both sequences end with the same
        # completion block, so TRL's `logits_to_keep` = completion length aligns them on the completion tokens.
        self._teacher_sequence = (
            torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1),
        )
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
        teacher_input_ids, teacher_attention_mask = self._teacher_sequence
        if isinstance(unwrapped_model, _AdapterSnapshot):
            with unwrapped_model.active() as shared_model:
                return super()._get_last_hidden_state(
                    shared_model, teacher_input_ids, teacher_attention_mask, logits_to_keep
                )
        return super()._get_last_hidden_state(
            unwrapped_model, teacher_input_ids, teacher_attention_mask, logits_to_keep
        )


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


def _as_reward_funcs(reward_funcs) -> list[Callable]:
    if reward_funcs is None:
        return []
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for func in funcs:
        if not callable(func):
            raise TypeError(
                f"OPSDCTrainer's reward_funcs must be callables with TRL's reward signature, got "
                f"{type(func).__name__}. They are only logged (e.g. trl_tip.math_reward for accuracy)."
            )
    return funcs


def _reward_func_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


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
