"""Configuration of the [`OPSDCTrainer`]."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from transformers.trainer_utils import SchedulerType
from trl import DistillationConfig

from ...instructions import INSTRUCTION_POSITIONS, check_teacher_prompt_template, resolve_instruction
from .._inputs import check_sampling, pin_memory_where_it_helps


LOSS_NORMALIZATIONS = ("rollout", "token")


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
