"""TIP: on-policy distillation that trains only on the tokens that matter."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import trl.trainer.distillation_trainer as _trl_distillation
from trl import DistillationConfig, DistillationTrainer

from ..hub import TrlTipHubMixin
from ..losses import STUDENT_SIDE_METHODS, selective_divergence_loss
from ..quantization import keep_4bit_weights_trainable
from ..selection import SELECTION_METHODS, quadrant_counts, tokens_per_rollout


TEACHER_QUANTIZATION = ("none", "4bit", "8bit")


def teacher_quantization_config(mode: str, compute_dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` for a `teacher_quantization` mode (`None` for `"none"`)."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


@contextlib.contextmanager
def _teacher_init_kwargs(args, teacher_model):
    # TRL loads a teacher given by path with `args.teacher_model_init_kwargs`; add the quantisation config there for
    # the length of the constructor only, so the config object itself stays serialisable.
    if args is None or getattr(args, "teacher_quantization", "none") == "none" or not isinstance(teacher_model, str):
        yield
        return
    original = args.teacher_model_init_kwargs
    dtype = (original or {}).get("dtype")
    compute_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
    if compute_dtype is None and not args.bf16:
        compute_dtype = torch.float32
    args.teacher_model_init_kwargs = {
        **(original or {}),
        "quantization_config": teacher_quantization_config(args.teacher_quantization, compute_dtype),
    }
    try:
        yield
    finally:
        args.teacher_model_init_kwargs = original


@dataclass
class TipDistillConfig(DistillationConfig):
    r"""
    Configuration class for the [`TipDistillTrainer`].

    Extends [`~trl.DistillationConfig`] with the token-selection parameters of TIP (Token Importance in on-Policy
    distillation). Every other parameter, including `beta` (the divergence: `1.0` reverse KL, the on-policy
    distillation default), behaves as in TRL.

    Parameters:
        token_selection (`str`, *optional*, defaults to `"soft_or"`):
            Which completion tokens the loss is computed on. `"all"` (plain on-policy distillation, identical to
            [`~trl.DistillationTrainer`]), `"random"`, `"entropy_sample"`, `"entropy_topk"`, `"divergence_topk"`,
            `"soft_or"` (the TIP rule: high student entropy *or* high divergence) or `"overconfident"` (confident and
            far from the teacher).
        token_ratio (`float`, *optional*, defaults to `0.5`):
            Fraction ρ ∈ (0, 1] of each rollout's completion tokens that is kept (at least one per non-empty rollout).
            Ignored by `"all"`.
        entropy_clip_quantile (`float`, *optional*, defaults to `0.98`):
            Batch quantile at which the student's entropy is clipped before min-max normalisation (`"soft_or"`,
            `"overconfident"`). `1.0` disables the clip.
        teacher_quantization (`str`, *optional*, defaults to `"none"`):
            Load the teacher (when given as a path or Hub id) in `"4bit"` (nf4, double quantisation) or `"8bit"`
            with bitsandbytes, independently of the student. A quantised student (`quantization_config`, or
            `--load_in_4bit` in the examples) never quantises the teacher.
    """

    token_selection: str = field(
        default="soft_or",
        metadata={
            "help": "Which completion tokens the loss is computed on: 'all' (plain on-policy distillation, identical "
            "to trl.DistillationTrainer), 'random', 'entropy_sample', 'entropy_topk', 'divergence_topk', 'soft_or' "
            "(the TIP rule: high entropy or high divergence) or 'overconfident' (confident and far from the teacher).",
            "choices": list(SELECTION_METHODS),
        },
    )
    token_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of each rollout's completion tokens kept, in (0, 1]; at least one token per non-empty "
            "rollout. Ignored by token_selection='all'."
        },
    )
    entropy_clip_quantile: float = field(
        default=0.98,
        metadata={
            "help": "Batch quantile at which the student's entropy is clipped before min-max normalisation "
            "('soft_or', 'overconfident'), in (0, 1]; 1.0 disables the clip."
        },
    )

    teacher_quantization: str = field(
        default="none",
        metadata={
            "help": "Load the teacher in '4bit' (nf4) or '8bit' with bitsandbytes, independently of the student; "
            "'none' keeps it unquantised. The student's quantization never applies to the teacher.",
            "choices": list(TEACHER_QUANTIZATION),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_quantization not in TEACHER_QUANTIZATION:
            raise ValueError(
                f"teacher_quantization must be one of {', '.join(TEACHER_QUANTIZATION)}, got "
                f"{self.teacher_quantization!r}."
            )
        if self.teacher_quantization != "none" and "quantization_config" in (self.teacher_model_init_kwargs or {}):
            raise ValueError(
                "Set the teacher's quantization once: either teacher_quantization or "
                "teacher_model_init_kwargs['quantization_config'], not both."
            )
        if self.token_selection not in SELECTION_METHODS:
            raise ValueError(
                f"token_selection must be one of {', '.join(SELECTION_METHODS)}, got {self.token_selection!r}."
            )
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError(
                f"token_ratio must be in (0, 1], got {self.token_ratio}. Use token_selection='all' to train on every "
                "completion token."
            )
        if not 0.0 < self.entropy_clip_quantile <= 1.0:
            raise ValueError(f"entropy_clip_quantile must be in (0, 1], got {self.entropy_clip_quantile}.")


def check_prompt_column(dataset, name: str) -> None:
    """Fail before any model is loaded when a map-style dataset lacks the `prompt` column on-policy training needs."""
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict passed where a split was expected
        raise ValueError(f"`{name}` is a DatasetDict with splits {sorted(columns)}; pass one split, e.g. dataset['train'].")
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"`{name}` has columns {columns} but no `prompt` column. On-policy distillation generates from the "
            "prompts: rename your prompt column to `prompt` (plain text or a list of chat messages)."
        )


@contextlib.contextmanager
def _divergence_loss_replaced_by(loss_fn):
    # `DistillationTrainer._compute_loss` builds both models' hidden states, heads and logit post-processing, then calls
    # the module-level `_chunked_divergence_loss`, looked up at call time. Swapping that one function for the length of
    # one `_compute_loss` call is the narrowest hook TRL 1.16 offers between "hidden states" and "divergence".
    original = _trl_distillation._chunked_divergence_loss
    _trl_distillation._chunked_divergence_loss = loss_fn
    try:
        yield
    finally:
        _trl_distillation._chunked_divergence_loss = original


class TipDistillTrainer(TrlTipHubMixin, DistillationTrainer):
    """
    On-policy distillation on the tokens that matter (TIP).

    The student generates completions, both models score every completion token in one chunked pass without gradient
    (normalised student entropy, reverse KL, forward KL), a selection rule keeps a fraction of each rollout's tokens,
    and the divergence is trained on the kept tokens only: unkept tokens pay neither the loss nor the backward pass
    through the `lm_head`. With `token_selection="all"` the losses and updates are those of
    [`~trl.DistillationTrainer`], bit for bit.

    The constructor is [`~trl.DistillationTrainer`]'s. Logged per step, besides TRL's metrics: `tip/kept_fraction`,
    the quadrant shares `tip/q1_share` … `tip/q4_share` (batch-median split of entropy and divergence; Q3 = confident
    and far from the teacher), and the mean normalised entropy and reverse KL of kept vs all tokens
    (`tip/entropy_kept`, `tip/entropy_all`, `tip/divergence_kept`, `tip/divergence_all`). The rules that select from
    the student alone (`random`, `entropy_sample`, `entropy_topk`) project the teacher's `lm_head` on the kept tokens
    only, so they log neither `tip/divergence_all` nor the quadrant shares.

    Example:

    ```python
    >>> from trl_tip import TipDistillConfig, TipDistillTrainer
    >>> from trl_tip.tasks import prepare_arithmetic_models

    >>> built = prepare_arithmetic_models()
    >>> trainer = TipDistillTrainer(
    ...     model=built["student"],
    ...     teacher_model=built["teacher"],
    ...     args=TipDistillConfig("tip-out", token_selection="soft_or", token_ratio=0.5, bf16=False),
    ...     train_dataset=built["dataset"]["train"],
    ... )
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-tip", "distillation", "tip"]
    _name = "TIP distillation"
    _paper = {"title": "TIP: Token Importance in On-Policy Distillation", "id": "2604.14084"}
    _card_fields = ("token_selection", "token_ratio", "entropy_clip_quantile", "teacher_quantization")

    def __init__(self, *args, **kwargs):
        check_prompt_column(kwargs.get("train_dataset", args[3] if len(args) > 3 else None), "train_dataset")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        teacher = kwargs.get("teacher_model", args[1] if len(args) > 1 else None)
        if getattr(config, "teacher_quantization", "none") != "none" and not isinstance(teacher, str):
            raise ValueError(
                "teacher_quantization applies when the teacher is loaded by the trainer: pass `teacher_model` as a "
                "path or Hub id, or quantise the instance you pass yourself."
            )
        with _teacher_init_kwargs(config, teacher):
            super().__init__(*args, **kwargs)
        if not isinstance(self.args, TipDistillConfig):
            raise TypeError(
                f"TipDistillTrainer needs a TipDistillConfig as `args`, got {type(self.args).__name__}. "
                "TipDistillConfig accepts every DistillationConfig field."
            )
        keep_4bit_weights_trainable(self.model)
        self.token_selection = self.args.token_selection
        self.token_ratio = self.args.token_ratio
        self.entropy_clip_quantile = self.args.entropy_clip_quantile
        # A private random source for 'random'/'entropy_sample', so that selecting tokens never shifts the global RNG
        # that generation samples from; one stream per process.
        self._selection_generator = torch.Generator().manual_seed(self.args.seed + self.accelerator.process_index)
        self._tip_sums = None

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.token_selection != "all":
            # The loss is normalised by the number of kept tokens over the whole generation batch (all accumulation
            # steps, all processes), as TRL normalises by all tokens. Each rollout keeps max(1, ⌊ρ·m_i⌋) tokens, so the
            # count follows from the completion lengths and is known here, before any loss is computed.
            loss_mask = output["completion_mask"]
            if "tool_mask" in output:
                loss_mask = loss_mask * output["tool_mask"]
            kept = tokens_per_rollout(loss_mask, self.token_ratio).sum()
            output["num_items_in_batch"] = self.accelerator.gather(kept).sum()
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        with _divergence_loss_replaced_by(self._selective_divergence_loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = output[0] if return_outputs else output
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"The distillation loss is {loss.item()} at step {self.state.global_step}; refusing to step on it. "
                "Check the teacher's outputs and the learning rate (bf16 overflow and a diverged student are the "
                "usual causes)."
            )
        # Logged after the wrapped forward returns, so the gather never runs inside the DDP/FSDP forward.
        mode = "train" if self.model.training else "eval"
        sums = self.accelerator.gather(self._tip_sums.unsqueeze(0)).sum(0).tolist()
        n_valid, n_kept, h_all, h_kept, d_all, d_kept, *quadrants = sums
        metrics = self._metrics[mode]
        metrics["tip/kept_fraction"].append(n_kept / n_valid if n_valid else 0.0)
        metrics["tip/entropy_all"].append(h_all / n_valid if n_valid else 0.0)
        metrics["tip/entropy_kept"].append(h_kept / n_kept if n_kept else 0.0)
        metrics["tip/divergence_kept"].append(d_kept / n_kept if n_kept else 0.0)
        if self.token_selection not in STUDENT_SIDE_METHODS:
            # The entropy-only rules never score the divergence of unkept tokens.
            metrics["tip/divergence_all"].append(d_all / n_valid if n_valid else 0.0)
            for name, count in zip(("q1", "q2", "q3", "q4"), quadrants, strict=True):
                metrics[f"tip/{name}_share"].append(count / n_valid if n_valid else 0.0)
        return output

    def _selective_divergence_loss(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same signature and return value as TRL's `_chunked_divergence_loss`; see `_divergence_loss_replaced_by`.
        result = selective_divergence_loss(
            *args,
            method=self.token_selection,
            ratio=self.token_ratio,
            entropy_clip_quantile=self.entropy_clip_quantile,
            generator=self._selection_generator,
            **kwargs,
        )
        mask, keep, entropy, reverse_kl = result.mask, result.keep, result.entropy, result.reverse_kl
        with torch.no_grad():
            # Under the entropy-only rules the divergence exists on kept tokens only (NaN elsewhere): the sums over
            # all tokens are placeholders, not logged (see `compute_loss`).
            scored_everywhere = self.token_selection not in STUDENT_SIDE_METHODS
            self._tip_sums = torch.cat(
                [
                    torch.stack(
                        [
                            mask.sum().float(),
                            keep.sum().float(),
                            entropy[mask].sum(),
                            entropy[keep].sum(),
                            reverse_kl[mask].sum() if scored_everywhere else entropy.new_zeros(()),
                            reverse_kl[keep].sum(),
                        ]
                    ),
                    quadrant_counts(entropy, reverse_kl, mask).to(entropy.device)
                    if scored_everywhere
                    else entropy.new_zeros(4),
                ]
            )
        return result.loss, result.entropy_sum, result.num_valid
