"""Configuration of the [`TipDistillTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DistillationConfig

from ...losses import SELECTION_DIVERGENCES
from ...selection import SELECTION_METHODS
from .._inputs import check_sampling, pin_memory_where_it_helps


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
        divergence_clip_quantile (`float`, *optional*, defaults to `1.0`):
            Batch quantile at which the reverse KL is clipped before soft-OR's min-max normalisation, so that a few
            heavy-tailed outliers cannot squash `δ̂` for every other token (and turn soft-OR into entropy ranking).
            `1.0` disables the clip. Only for `token_selection="soft_or"` with `selection_divergence="reverse_kl"`.
        selection_divergence (`str`, *optional*, defaults to `"reverse_kl"`):
            The divergence `"soft_or"` and `"divergence_topk"` rank tokens by: `"reverse_kl"`, or `"jsd"`, the
            Jensen-Shannon divergence divided by ln 2 (bounded in [0, 1], used by soft-OR as `δ̂` without min-max, as
            the TIP authors' scoring code does; it costs a second chunked pass without gradient). Ranking only: the
            loss trained on the kept tokens is TRL's divergence with `beta` either way.

        teacher_quantization (`str`, *optional*, defaults to `"none"`):
            Load the teacher (when given as a path or Hub id) in `"4bit"` (nf4, double quantisation) or `"8bit"`
            with bitsandbytes, independently of the student. A quantised student (`quantization_config`, or
            `--load_in_4bit` in the examples) never quantises the teacher.
        check_teacher_tokenizer (`bool`, *optional*, defaults to `True`):
            When the teacher comes with a tokenizer (saved next to its weights), compare it with the student's at
            init: fail on the first id that is another token for each, or on another end-of-turn token of the chat
            template; warn on differences that change no id's token (special-token attributes such as a base
            model's eos against its instruct sibling's, tokens past the shorter tokenizer). A teacher without a
            tokenizer is not checked, with a warning. `False` skips the comparison: you assert that the teacher reads
            the student's token ids, which also lets heads padded to different sizes be compared over the student
            tokenizer's tokens.

        > Served teacher

        teacher_model_server_url (`str` or `None`, *optional*):
            Base URL of a vLLM server hosting the teacher (`trl vllm-serve --model TEACHER`, e.g.
            `"http://localhost:8000"`), as in TRL's `ServerDistillationConfig`. No teacher model is then loaded in the
            trainer (pass no `teacher_model`): per completion token the server returns the teacher's top-`loss_top_k`
            log-probabilities and its log-probability of the completion's token, and the divergences are taken on that
            sparse support plus a tail bucket for the remaining mass. The student's entropy stays exact; see the
            "Served teacher" section of the TIP documentation for what is approximated.
        loss_top_k (`int`, *optional*, defaults to `1`):
            Number of top tokens the teacher server returns per position, as in TRL's `ServerDistillationConfig`. The
            support is the teacher's top-k tokens for `beta=0`; the top-k and the completion's token for `beta > 0`
            (for `beta=1` with `loss_top_k=1`, the completion's token alone, TRL's top-1 rule). Only used with
            `teacher_model_server_url`.
        teacher_server_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds a request to the teacher server may take before it counts as failed.
        teacher_server_retries (`int`, *optional*, defaults to `3`):
            How many times a failed or timed-out request to the teacher server is sent again (after
            `teacher_server_backoff` seconds, doubled each time) before training stops with an error naming the step.
            No step is taken on a batch without its teacher log-probabilities.
        teacher_server_backoff (`float`, *optional*, defaults to `2.0`):
            Seconds before the first retry of a failed request to the teacher server; doubled before each next one.

    Batch statistics (the quantile clips, min-max normalisation, the quadrant medians) are taken over the completion
    tokens of the micro-batch one loss call sees, i.e. `per_device_train_batch_size` rollouts on one process, so the
    tokens soft-OR keeps depend on that batch size.
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

    divergence_clip_quantile: float = field(
        default=1.0,
        metadata={
            "help": "Batch quantile at which the reverse KL is clipped before soft-OR's min-max normalisation, in "
            "(0, 1]; 1.0 disables the clip. Only with token_selection='soft_or' and selection_divergence='reverse_kl'."
        },
    )
    selection_divergence: str = field(
        default="reverse_kl",
        metadata={
            "help": "Divergence that 'soft_or' and 'divergence_topk' rank tokens by: 'reverse_kl', or 'jsd' (JSD / ln 2, "
            "bounded in [0, 1], used by soft-OR without min-max). Ranking only: the trained loss is the divergence "
            "set by beta either way.",
            "choices": list(SELECTION_DIVERGENCES),
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

    check_teacher_tokenizer: bool = field(
        default=True,
        metadata={
            "help": "Compare the teacher's tokenizer (when it has one) with the student's at init: fail on the first "
            "id that is another token, or another chat-template end-of-turn token; warn on special-token attribute "
            "differences and on tokens past the shorter tokenizer. False skips the check: you assert the teacher "
            "reads the student's token ids (heads padded to different sizes are then compared over the student "
            "tokenizer's tokens)."
        },
    )

    teacher_model_server_url: str | None = field(
        default=None,
        metadata={
            "help": 'Base URL of a vLLM server hosting the teacher (e.g. "http://localhost:8000"); no teacher model '
            "is loaded in the trainer and the divergences use the top-k log-probabilities the server returns."
        },
    )
    loss_top_k: int = field(
        default=1,
        metadata={
            "help": "Number of top tokens the teacher server returns per position and over which (with the "
            "completion's token when beta > 0, and a tail bucket) the divergence is computed. Only with "
            "teacher_model_server_url."
        },
    )
    teacher_server_timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds a request to the teacher server may take before it counts as failed."},
    )
    teacher_server_retries: int = field(
        default=3,
        metadata={
            "help": "How many times a failed request to the teacher server is retried (with backoff) before training "
            "stops with an error naming the step."
        },
    )
    teacher_server_backoff: float = field(
        default=2.0,
        metadata={"help": "Seconds before the first retry of a failed teacher-server request; doubled each time."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_served_teacher()
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
        if self.selection_divergence not in SELECTION_DIVERGENCES:
            raise ValueError(
                f"selection_divergence must be one of {', '.join(SELECTION_DIVERGENCES)}, got "
                f"{self.selection_divergence!r}."
            )
        if self.selection_divergence != "reverse_kl" and self.token_selection not in ("soft_or", "divergence_topk"):
            raise ValueError(
                f"selection_divergence={self.selection_divergence!r} changes how 'soft_or' and 'divergence_topk' rank "
                f"tokens; token_selection={self.token_selection!r} does not rank by divergence. Leave "
                "selection_divergence at 'reverse_kl' or choose one of those rules."
            )
        if not 0.0 < self.divergence_clip_quantile <= 1.0:
            raise ValueError(f"divergence_clip_quantile must be in (0, 1], got {self.divergence_clip_quantile}.")
        if self.divergence_clip_quantile < 1.0 and (
            self.token_selection != "soft_or" or self.selection_divergence != "reverse_kl"
        ):
            raise ValueError(
                f"divergence_clip_quantile={self.divergence_clip_quantile} clips the reverse KL before soft-OR's "
                "min-max normalisation; it applies only with token_selection='soft_or' and "
                f"selection_divergence='reverse_kl' (got {self.token_selection!r}, {self.selection_divergence!r}). "
                "Set it to 1.0."
            )
        check_sampling(self.temperature, self.generation_kwargs)
        pin_memory_where_it_helps(self)

    def _check_served_teacher(self) -> None:
        if self.teacher_model_server_url is not None and not self.teacher_model_server_url.strip():
            raise ValueError("teacher_model_server_url is empty; pass the server's base URL or leave it unset.")
        if self.loss_top_k < 1:
            raise ValueError(
                f"loss_top_k must be at least 1, got {self.loss_top_k}: a teacher server returns its top-k "
                "log-probabilities only, so the full-vocabulary divergence (TRL's loss_top_k=0) is not available."
            )
        if self.teacher_server_timeout <= 0:
            raise ValueError(f"teacher_server_timeout must be positive, got {self.teacher_server_timeout}.")
        if self.teacher_server_retries < 0:
            raise ValueError(f"teacher_server_retries must be >= 0, got {self.teacher_server_retries}.")
        if self.teacher_server_backoff < 0:
            raise ValueError(f"teacher_server_backoff must be >= 0, got {self.teacher_server_backoff}.")
        if self.teacher_model_server_url is None:
            return
        if self.teacher_model_name_or_path is not None:
            raise ValueError(
                f"teacher_model_server_url={self.teacher_model_server_url!r} serves the teacher; unset "
                f"teacher_model_name_or_path={self.teacher_model_name_or_path!r}, which would load one in the trainer."
            )
        if self.teacher_quantization != "none":
            raise ValueError(
                f"teacher_quantization={self.teacher_quantization!r} quantises a teacher loaded in the trainer; with "
                "teacher_model_server_url the teacher is served: leave it at 'none' (quantise it in the server)."
            )
        student_server = self.vllm_server_base_url or (
            f"http://{self.vllm_server_host}:{self.vllm_server_port}" if self.vllm_mode == "server" else None
        )
        if self.use_vllm and self.vllm_mode == "server" and student_server is not None and (
            student_server.rstrip("/") == self.teacher_model_server_url.rstrip("/")
        ):
            raise ValueError(
                f"The student's vLLM server (vllm_server_base_url) and the teacher's (teacher_model_server_url) are "
                f"both {self.teacher_model_server_url!r}: the student's weights would be pushed into the teacher. "
                "Serve the student on another port."
            )
