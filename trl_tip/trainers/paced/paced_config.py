"""Configuration of the [`PacedTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...selection import SELECTION_METHODS
from ..tip_distill import TipDistillConfig


PASS_RATE_MODES = ("once", "refresh", "online")
PACED_SAMPLING_MODES = ("weight", "sample")
ROLLOUT_SOURCES = ("student", "teacher")
KL_SCHEDULES = ("reverse", "forward", "forward_then_reverse")
TEACHER_COMPLETION_SOURCES = ("auto", "dataset", "generate")
# Names under which `reward_funcs` may name the built-in verifiable math reward.


@dataclass
class PacedConfig(TipDistillConfig):
    r"""
    Configuration class for the [`PacedTrainer`].

    Extends [`TipDistillConfig`] (so TIP's token selection composes with PACED's problem weighting) with the parameters
    of PACED. Each problem is weighted by `p^α (1 − p)^β`, `p` being the student's pass rate on it.

    Parameters:
        > Problem weighting

        paced_alpha (`float`, *optional*, defaults to `1.0`):
            Exponent α ≥ 0 of the pass rate `p` in the weight.
        paced_beta (`float`, *optional*, defaults to `1.0`):
            Exponent β ≥ 0 of `1 − p` in the weight. `paced_alpha = paced_beta = 0` weighs every problem equally.
        paced_sampling (`str`, *optional*, defaults to `"weight"`):
            How the weight enters training. `"weight"`: problems are drawn as TRL draws them and each rollout's loss
            is weighted, `Σ_i w_i ℓ_i / Σ_i w_i`. `"sample"`: each generation batch's problems are drawn i.i.d. with
            probability `w_i / Σ_j w_j` from the whole table (as it is at that step), and the loss is the plain mean
            `(1/n) Σ_i ℓ_i`: the same objective in expectation, but problems of weight 0 (`p` = 0, 1 or unknown) are
            never rolled out, so a smaller batch carries the same signal.

        > Pass-rate estimation

        pass_rate_rollouts (`int`, *optional*, defaults to `8`):
            K: student rollouts per problem, graded by the reward functions, from which a pass rate is estimated.
        pass_rate_mode (`str`, *optional*, defaults to `"once"`):
            `"once"`: estimated before training with the initial student and kept fixed. `"refresh"`: re-estimated with
            the current student every `pass_rate_refresh_steps` optimiser steps. `"online"`: estimated once, then
            updated from the student rollouts training draws, as an exponential moving average with rate
            `pass_rate_ema`.
        pass_rate_refresh_steps (`int` or `None`, *optional*, defaults to `None`):
            Optimiser steps between two re-estimations; required by, and only used with, `pass_rate_mode="refresh"`.
        pass_rate_ema (`float`, *optional*, defaults to `0.1`):
            Weight of a new observation in the online moving average, in (0, 1] (`pass_rate_mode="online"`).
        pass_rate_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Problems per process per generation call of the estimation (each gives K rollouts). Defaults to
            `per_device_train_batch_size × gradient_accumulation_steps`.

        > Tracks and schedule

        rollout_source (`str`, *optional*, defaults to `"student"`):
            Who writes the completions trained on: `"student"` (on-policy rollouts) or `"teacher"` (off-policy: the
            teacher's completions, on which the student is scored; the forward-KL track of PACED).
        teacher_completions (`str`, *optional*, defaults to `"generate"`):
            Where teacher completions come from: `"generate"` (sampled from the teacher with transformers' `generate`,
            same sampling settings as the student: the paper's protocol, distillation on the teacher's own
            responses), `"dataset"` (the dataset's `completion` column, e.g. reference solutions), or `"auto"`
            (`"dataset"` when the column exists, else `"generate"`).
        kl_schedule (`str` or `None`, *optional*, defaults to `None`):
            `None`: TRL's `beta` throughout (`1.0`, its default, is reverse KL; `0.0` forward KL; in between the
            generalised JSD). `"reverse"`: reverse KL throughout (`beta=1`). `"forward"`: forward KL throughout
            (`beta=0`). `"forward_then_reverse"`: forward KL on teacher completions, then, from the switch step on,
            reverse KL on student rollouts. A schedule sets `beta`, which must then be left at its default.
        schedule_switch_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of the training steps after which `"forward_then_reverse"` switches: the switch step is
            `⌊fraction × max_steps⌋`.
        self_distillation (`bool`, *optional*, defaults to `False`):
            Use a frozen copy of the initial student as the teacher, reading the problem with privileged context: the
            reference solution where the dataset has one, else the ground-truth answer (`privileged_context_column`,
            `privileged_prompt_template`); no teacher model is given.
        privileged_context_column (`str` or `None`, *optional*, defaults to `None`):
            Column the self-distillation teacher reads as privileged context. `None`: `solution` (a reference
            solution) when the dataset has that column, else `answer`.
        privileged_prompt_template (`str` or `None`, *optional*, defaults to `None`):
            The self-distillation teacher's version of the last user turn, with `{problem}` (the original text) and
            `{context}` (the privileged context; `{answer}` is accepted for it too). `None`: the OPSD authors' layout
            for a reference solution (`"## Problem\n{problem}\n\n## Reference Solution\n{context}\n\nAfter
            understanding the reference solution, solve the problem step by step using your own approach."`), or
            `"{problem}\n\nThe correct final answer is {context}."` when the context is the `answer` column.

    > [!NOTE]
    > `token_selection` defaults to `"all"` here (plain PACED); any TIP rule can be combined with the weighting. `beta`
    > means what it means in TRL unless a `kl_schedule` is given, which sets it.
    """

    token_selection: str = field(
        default="all",
        metadata={
            "help": "Which completion tokens the loss is computed on (TIP rules): 'all' (plain PACED), 'random', "
            "'entropy_sample', 'entropy_topk', 'divergence_topk', 'soft_or' or 'overconfident'.",
            "choices": list(SELECTION_METHODS),
        },
    )
    paced_alpha: float = field(
        default=1.0,
        metadata={"help": "Exponent alpha >= 0 of the pass rate p in the problem weight p^alpha (1-p)^beta."},
    )
    paced_beta: float = field(
        default=1.0,
        metadata={"help": "Exponent beta >= 0 of (1-p) in the problem weight; alpha = beta = 0 weighs all equally."},
    )
    paced_sampling: str = field(
        default="weight",
        metadata={
            "help": "'weight' (weight each rollout's loss by w(p)) or 'sample' (draw problems with probability "
            "proportional to w(p) and take the plain mean; weight-0 problems are never rolled out).",
            "choices": list(PACED_SAMPLING_MODES),
        },
    )
    pass_rate_rollouts: int = field(
        default=8, metadata={"help": "K: graded student rollouts per problem from which its pass rate is estimated."}
    )
    pass_rate_mode: str = field(
        default="once",
        metadata={
            "help": "'once' (estimated before training, fixed), 'refresh' (re-estimated every "
            "pass_rate_refresh_steps) or 'online' (then updated from training's own student rollouts, as a moving "
            "average).",
            "choices": list(PASS_RATE_MODES),
        },
    )
    pass_rate_refresh_steps: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps between re-estimations; required by pass_rate_mode='refresh' only."},
    )
    pass_rate_ema: float = field(
        default=0.1,
        metadata={"help": "Weight of a new observation in the online moving average of pass rates, in (0, 1]."},
    )
    pass_rate_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Problems per process per generation call when estimating pass rates (each gives K rollouts). "
            "Defaults to per_device_train_batch_size * gradient_accumulation_steps."
        },
    )
    rollout_source: str = field(
        default="student",
        metadata={
            "help": "Who writes the completions trained on: 'student' (on-policy) or 'teacher' (off-policy teacher "
            "completions, the forward-KL track).",
            "choices": list(ROLLOUT_SOURCES),
        },
    )
    teacher_completions: str = field(
        default="generate",
        metadata={
            "help": "Source of teacher completions: 'generate' (sampled from the teacher, the paper's protocol), "
            "'dataset' (the `completion` column) or 'auto' ('dataset' when the column exists).",
            "choices": list(TEACHER_COMPLETION_SOURCES),
        },
    )
    kl_schedule: str | None = field(
        default=None,
        metadata={
            "help": "None (TRL's beta throughout: 1.0 reverse KL, 0.0 forward KL), 'reverse' (reverse KL throughout), "
            "'forward' (forward KL throughout) or 'forward_then_reverse' (forward KL on teacher completions, then "
            "reverse KL on student rollouts). A schedule sets beta.",
            "choices": list(KL_SCHEDULES),
        },
    )
    schedule_switch_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of max_steps after which 'forward_then_reverse' switches, in (0, 1)."},
    )
    self_distillation: bool = field(
        default=False,
        metadata={
            "help": "Teacher = frozen copy of the initial student that reads privileged context in its prompt: the "
            "reference solution when the dataset has one, else the ground-truth answer (privileged_context_column)."
        },
    )
    privileged_context_column: str | None = field(
        default=None,
        metadata={
            "help": "Column the self-distillation teacher reads as privileged context. None: 'solution' (a "
            "reference solution) when the dataset has it, else 'answer'."
        },
    )
    privileged_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "The self-distillation teacher's last user turn, with placeholders {problem} and {context} (or "
            "{answer}). None: a reference-solution layout for a solution column, 'The correct final answer is ...' "
            "for the answer column."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_weighting()
        self._check_tracks()
        self._check_self_distillation()

    def _check_weighting(self) -> None:
        """Problem weights and pass-rate estimation."""
        if self.paced_alpha < 0 or self.paced_beta < 0:
            raise ValueError(
                f"paced_alpha and paced_beta must be >= 0, got {self.paced_alpha} and {self.paced_beta}. The weight "
                "p^alpha (1-p)^beta peaks at p = alpha / (alpha + beta)."
            )
        if self.paced_sampling not in PACED_SAMPLING_MODES:
            raise ValueError(
                f"paced_sampling must be one of {', '.join(PACED_SAMPLING_MODES)}, got {self.paced_sampling!r}."
            )
        if self.pass_rate_rollouts < 1:
            raise ValueError(f"pass_rate_rollouts must be >= 1, got {self.pass_rate_rollouts}.")
        if self.pass_rate_mode not in PASS_RATE_MODES:
            raise ValueError(
                f"pass_rate_mode must be one of {', '.join(PASS_RATE_MODES)}, got {self.pass_rate_mode!r}."
            )
        if self.pass_rate_mode == "refresh":
            if self.pass_rate_refresh_steps is None or self.pass_rate_refresh_steps < 1:
                raise ValueError(
                    "pass_rate_mode='refresh' needs pass_rate_refresh_steps >= 1 (optimiser steps between "
                    f"re-estimations), got {self.pass_rate_refresh_steps}."
                )
        elif self.pass_rate_refresh_steps is not None:
            raise ValueError(
                f"pass_rate_refresh_steps is only used with pass_rate_mode='refresh', but pass_rate_mode is "
                f"{self.pass_rate_mode!r}; unset it or set pass_rate_mode='refresh'."
            )
        if not 0.0 < self.pass_rate_ema <= 1.0:
            raise ValueError(f"pass_rate_ema must be in (0, 1], got {self.pass_rate_ema}.")
        if self.pass_rate_batch_size is not None and self.pass_rate_batch_size < 1:
            raise ValueError(f"pass_rate_batch_size must be >= 1 or None, got {self.pass_rate_batch_size}.")

    def _check_tracks(self) -> None:
        """Rollout source, teacher completions and the KL schedule (which may set `beta`)."""
        if self.rollout_source not in ROLLOUT_SOURCES:
            raise ValueError(
                f"rollout_source must be one of {', '.join(ROLLOUT_SOURCES)}, got {self.rollout_source!r}."
            )
        if self.teacher_completions not in TEACHER_COMPLETION_SOURCES:
            raise ValueError(
                f"teacher_completions must be one of {', '.join(TEACHER_COMPLETION_SOURCES)}, got "
                f"{self.teacher_completions!r}."
            )
        if self.kl_schedule is not None and self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(
                f"kl_schedule must be None or one of {', '.join(KL_SCHEDULES)}, got {self.kl_schedule!r}."
            )
        if not 0.0 < self.schedule_switch_fraction < 1.0:
            raise ValueError(f"schedule_switch_fraction must be in (0, 1), got {self.schedule_switch_fraction}.")
        # Without a schedule `beta` is TRL's; a schedule sets it (1.0 is DistillationConfig's default).
        if self.kl_schedule == "forward" and self.beta in (0.0, 1.0):
            self.beta = 0.0
        elif self.kl_schedule is not None and self.beta != 1.0:
            raise ValueError(
                f"beta={self.beta} conflicts with kl_schedule={self.kl_schedule!r}, which sets the divergence itself "
                "('reverse': beta=1, 'forward': beta=0, 'forward_then_reverse': 0 then 1). Leave kl_schedule unset to "
                f"train with TRL's beta={self.beta} throughout, or leave beta at its default."
            )
        if self.kl_schedule == "forward_then_reverse" and self.rollout_source != "student":
            raise ValueError(
                "kl_schedule='forward_then_reverse' trains on teacher completions before the switch and on student "
                "rollouts after it, so rollout_source must stay 'student'."
            )
        if self.pass_rate_mode == "online" and self.rollout_source == "teacher":
            raise ValueError(
                "pass_rate_mode='online' updates pass rates from the student rollouts training draws, but "
                "rollout_source='teacher' draws none. Use pass_rate_mode='once' or 'refresh'."
            )

    def _check_self_distillation(self) -> None:
        """The frozen-copy teacher and its privileged prompt."""
        if self.self_distillation and self.teacher_model_name_or_path is not None:
            raise ValueError(
                "self_distillation=True uses a frozen copy of the student as the teacher; unset "
                f"teacher_model_name_or_path (got {self.teacher_model_name_or_path!r})."
            )
        if self.self_distillation and self.teacher_model_server_url is not None:
            raise ValueError(
                "self_distillation=True makes the teacher the student itself (a frozen copy that reads privileged "
                "context), which no server can hold; unset teacher_model_server_url "
                f"(got {self.teacher_model_server_url!r}) or self_distillation."
            )
        if self.privileged_prompt_template is not None:
            try:
                rendered = self.privileged_prompt_template.format(
                    problem="\0problem\0", context="\0context\0", answer="\0context\0"
                )
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    "privileged_prompt_template may only use the placeholders {problem} and {context} (or {answer}; "
                    f"double other braces): {error!r} in {self.privileged_prompt_template!r}."
                ) from None
            if "\0problem\0" not in rendered or "\0context\0" not in rendered:
                raise ValueError(
                    "privileged_prompt_template must contain both {problem} and {context} (or {answer}), got "
                    f"{self.privileged_prompt_template!r}."
                )
        if self.privileged_context_column is not None and not self.self_distillation:
            raise ValueError(
                "privileged_context_column names what the self-distillation teacher reads; it needs "
                "self_distillation=True."
            )
