"""TIP: on-policy distillation that trains only on the tokens that matter."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DistillationConfig, DistillationTrainer

from .._trl_compat import divergence_loss_replaced_by, models_loaded_by_path_passed_to, platform_vllm_generation
from ..hub import TrlTipHubMixin
from ..losses import SELECTION_DIVERGENCES, STUDENT_SIDE_METHODS, selective_divergence_loss
from ..quantization import keep_4bit_weights_trainable
from ..resume import ResumableTrainerMixin, atomic_path
from ..selection import SELECTION_METHODS, quadrant_counts, quantile, tokens_per_rollout
from ..sharding import fsdp2_shard_for_inference, is_fsdp2
from ..vocabulary import compare_tokenizers, shared_vocab_size, tokenizer_of
from ._inputs import check_prompts, check_sampling, default_config, pin_memory_where_it_helps


TEACHER_QUANTIZATION = ("none", "4bit", "8bit")
# The token-selection generator's state, one file per process, saved in each checkpoint next to transformers' RNG files.
SELECTION_RNG_FILE = "tip_selection_rng_{process_index}.pth"


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


def _is_quantized(model) -> bool:
    # A quantised teacher (`teacher_quantization`) keeps TRL's preparation: one (already small) copy per rank.
    model = getattr(model, "module", model)
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_loaded_in_4bit", False)


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


def _load_teacher_tokenizer(teacher, args):
    # The tokenizer saved next to the teacher's weights, if any: a path or Hub id, or an instance's `name_or_path`.
    from transformers import AutoTokenizer

    source = teacher if isinstance(teacher, str) else getattr(teacher, "name_or_path", None)
    if not source:
        return None
    from transformers.utils import cached_file

    revision = args.teacher_model_revision if isinstance(teacher, str) else None
    try:
        # transformers builds an empty tokenizer from a config alone; only a saved tokenizer is the teacher's own.
        saved = any(
            cached_file(
                source,
                name,
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            for name in ("tokenizer_config.json", "tokenizer.json")
        )
        if not saved:
            return None
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _vocab_rows(model, revision=None, trust_remote_code=False) -> int:
    # `vocab_size` of a model's (text) config, read without loading weights when the model is a path.
    if isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    else:
        config = model.config
    return config.get_text_config().vocab_size


@contextlib.contextmanager
def _vocab_check_passed(teacher, student_rows: int):
    # `DistillationTrainer.__init__` refuses a teacher whose config `vocab_size` differs from the student's, right
    # after loading it. For heads padded to different sizes over one tokenizer, the teacher's config reports the
    # student's size for the length of the constructor (a teacher given by path is marked as TRL loads it), and the
    # real value is restored on exit.
    marked = []

    def mark(model):
        text_config = model.config.get_text_config()
        marked.append((text_config, text_config.vocab_size))
        text_config.vocab_size = student_rows

    def mark_the_teacher(path, model):
        if path == teacher:
            mark(model)

    if isinstance(teacher, str):
        marking = models_loaded_by_path_passed_to(mark_the_teacher)
    else:
        mark(teacher)
        marking = contextlib.nullcontext()
    try:
        with marking:
            yield
    finally:
        for text_config, rows in marked:
            text_config.vocab_size = rows


class TipDistillTrainer(ResumableTrainerMixin, TrlTipHubMixin, DistillationTrainer):
    """
    On-policy distillation on the tokens that matter (TIP).

    The student generates completions, both models score every completion token in one chunked pass without gradient
    (normalised student entropy, reverse KL, forward KL), a selection rule keeps a fraction of each rollout's tokens,
    and the divergence is trained on the kept tokens only: unkept tokens pay neither the loss nor the backward pass
    through the `lm_head`. With `token_selection="all"` the losses and updates are those of
    [`~trl.DistillationTrainer`], bit for bit.

    The constructor is [`~trl.DistillationTrainer`]'s; with `args=None` it builds a [`TipDistillConfig`] writing to
    `<model name>-TIP`, before any model is loaded. Logged per step, besides TRL's metrics: `tip/kept_fraction`,
    the quadrant shares `tip/q1_share` … `tip/q4_share` (batch-median split of entropy and reverse KL; Q3 = confident
    and far from the teacher), the mean normalised entropy and reverse KL of kept vs all tokens (`tip/entropy_kept`,
    `tip/entropy_all`, `tip/divergence_kept`, `tip/divergence_all`) and, for soft-OR, the spread of its divergence
    axis δ̂ over the micro-batch (`tip/divergence_hat_p50`, `tip/divergence_hat_p90`; a median near 0 means one outlier
    squashes the rest and soft-OR ranks by entropy alone, see `divergence_clip_quantile` and `selection_divergence`).
    The rules that select from the student alone (`random`, `entropy_sample`, `entropy_topk`) at ratio < 1 project the
    teacher's `lm_head` on the kept tokens only, so they log neither `tip/divergence_all` nor the quadrant shares.

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
    _card_fields = (
        "token_selection",
        "token_ratio",
        "entropy_clip_quantile",
        "divergence_clip_quantile",
        "selection_divergence",
        "teacher_quantization",
    )

    def __init__(
        self,
        model,
        teacher_model=None,
        args: TipDistillConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        if args is None:
            args = default_config(TipDistillConfig, model, "TIP")
        check_prompts(train_dataset, eval_dataset)
        check_sampling(args.temperature, args.generation_kwargs)
        if getattr(args, "teacher_quantization", "none") != "none" and not isinstance(teacher_model, str):
            raise ValueError(
                "teacher_quantization applies when the teacher is loaded by the trainer: pass `teacher_model` as a "
                "path or Hub id, or quantise the instance you pass yourself."
            )
        shared_rows = self._check_teacher_vocabulary(model, teacher_model, args, processing_class)
        vocab_check = (
            _vocab_check_passed(teacher_model, _vocab_rows(model, trust_remote_code=args.trust_remote_code))
            if shared_rows is not None
            else contextlib.nullcontext()
        )
        with _teacher_init_kwargs(args, teacher_model), vocab_check, platform_vllm_generation(args):
            super().__init__(
                model=model,
                teacher_model=teacher_model,
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
        if not isinstance(self.args, TipDistillConfig):
            raise TypeError(
                f"TipDistillTrainer needs a TipDistillConfig as `args`, got {type(self.args).__name__}. "
                "TipDistillConfig accepts every DistillationConfig field."
            )
        keep_4bit_weights_trainable(self.model)
        if is_fsdp2(self.accelerator) and self.teacher_model is not None and not _is_quantized(self.teacher_model):
            # TRL prepares the teacher in evaluation mode, which under FSDP2 leaves a full copy on every rank; shard it
            # like the student instead (inference only: no gradients, no optimiser state).
            self.teacher_model = fsdp2_shard_for_inference(
                self.accelerator.unwrap_model(self.teacher_model), self.accelerator
            )
        self.token_selection = self.args.token_selection
        self.token_ratio = self.args.token_ratio
        self.entropy_clip_quantile = self.args.entropy_clip_quantile
        self.divergence_clip_quantile = self.args.divergence_clip_quantile
        self.selection_divergence = self.args.selection_divergence
        # A private random source for 'random'/'entropy_sample', so that selecting tokens never shifts the global RNG
        # that generation samples from; one stream per process.
        self._selection_generator = torch.Generator().manual_seed(self.args.seed + self.accelerator.process_index)
        self._tip_sums = None
        # These rules project the teacher on kept tokens only (see `selective_divergence_loss`).
        self._scores_student_first = self.token_selection in STUDENT_SIDE_METHODS and self.token_ratio < 1.0
        self.shared_vocab_size = shared_rows
        if shared_rows is not None:
            self._suppress_padding_rows(shared_rows)

    @staticmethod
    def _check_teacher_vocabulary(model, teacher_model, args, processing_class) -> int | None:
        """
        Check that the teacher reads the student's token ids ([`~trl_tip.vocabulary.compare_tokenizers`]: an error on
        a difference that changes what the teacher scores, a warning on the others), and return how many `lm_head`
        rows the divergence compares (`None`: all, as TRL; else the shared tokenizer's size, for heads padded to
        different sizes).
        """
        if teacher_model is None or args is None:
            return None
        check = getattr(args, "check_teacher_tokenizer", True)
        student_tokenizer = processing_class
        if student_tokenizer is None:
            from transformers import AutoTokenizer

            source = model if isinstance(model, str) else getattr(model, "name_or_path", None)
            try:
                student_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
            except (OSError, ValueError, TypeError, KeyError):
                student_tokenizer = None  # TRL's own processor loading reports this
        teacher_tokenizer = _load_teacher_tokenizer(teacher_model, args) if check else None
        student_rows = _vocab_rows(model, trust_remote_code=args.trust_remote_code)
        teacher_rows = _vocab_rows(
            teacher_model,
            revision=args.teacher_model_revision if isinstance(teacher_model, str) else None,
            trust_remote_code=args.trust_remote_code,
        )
        if student_rows != teacher_rows and (student_tokenizer is None or (check and teacher_tokenizer is None)):
            raise ValueError(
                f"The student's lm_head has {student_rows} rows (vocab_size) and the teacher's {teacher_rows}. Heads "
                "padded to different sizes can be distilled when both models share one tokenizer, but the teacher "
                "comes with no tokenizer to compare with the student's. Save the teacher's tokenizer next to its "
                "weights, or set check_teacher_tokenizer=False if you know it is the student's."
            )
        if check and student_tokenizer is not None and teacher_tokenizer is None:
            source = teacher_model if isinstance(teacher_model, str) else getattr(teacher_model, "name_or_path", None)
            warnings.warn(
                f"The teacher ({source or 'a model built in memory, with no name_or_path'}) comes with no tokenizer, "
                "so the check that it reads the student's token ids is skipped. Save the teacher's tokenizer next to "
                "its weights to have it checked, or set check_teacher_tokenizer=False if you know the ids agree.",
                stacklevel=3,
            )
        if check and student_tokenizer is not None and teacher_tokenizer is not None:
            comparison = compare_tokenizers(student_tokenizer, teacher_tokenizer)
            if comparison.error is not None:
                heads = "" if student_rows == teacher_rows else (
                    f" (and the student's lm_head has vocab_size {student_rows}, the teacher's {teacher_rows})"
                )
                raise ValueError(
                    f"The teacher's tokenizer differs from the student's: {comparison.error}{heads}. Distillation "
                    "compares the two models' distributions id by id, so the teacher would score other tokens than "
                    "the student wrote. Use a teacher with the student's tokenizer (GOLD distils across tokenizers), "
                    "or set check_teacher_tokenizer=False if you know the ids agree."
                )
            if comparison.notes:
                warnings.warn(
                    "The teacher's tokenizer gives every id it shares with the student's the same token, but: "
                    + "; ".join(comparison.notes)
                    + ". Training goes ahead: the prompts are tokenized by the student's tokenizer only.",
                    stacklevel=3,
                )
        if student_rows == teacher_rows:
            return None
        rows = shared_vocab_size(student_rows, teacher_rows, len(tokenizer_of(student_tokenizer)))
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                f"The student's and teacher's lm_heads are padded to different sizes ({student_rows} vs "
                f"{teacher_rows} rows); comparing them over the {rows} shared tokens slices the heads, which DeepSpeed "
                "ZeRO-3 cannot do on its partitioned weights. Use ZeRO-1/2, FSDP or DDP for this pair."
            )
        return rows

    def _suppress_padding_rows(self, rows: int) -> None:
        # Neither model may write an id past the shared tokenizer: the other model has no such row (and the ids are
        # padding no text maps to). transformers' generation suppresses them; vLLM is restricted to the shared ids.
        student_rows = self.model.config.get_text_config().vocab_size
        teacher_rows = self.accelerator.unwrap_model(self.teacher_model).config.get_text_config().vocab_size
        padding = list(range(rows, max(student_rows, teacher_rows)))
        suppressed = sorted({*(self.generation_kwargs.get("suppress_tokens") or []), *padding})
        self.generation_kwargs["suppress_tokens"] = suppressed
        self.generation_config.suppress_tokens = suppressed
        vllm_generation = getattr(self, "vllm_generation", None)
        if vllm_generation is not None:
            vllm_generation.generation_kwargs = {
                **vllm_generation.generation_kwargs,
                "allowed_token_ids": list(range(rows)),
            }

    def _save_rng_state(self, output_dir: str) -> None:
        # 'random' and 'entropy_sample' draw from the selection generator; a resumed run must continue its stream.
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, SELECTION_RNG_FILE.format(process_index=self.args.process_index))
        with atomic_path(path) as temporary:
            torch.save(self._selection_generator.get_state(), temporary)

    def _checkpoint_files(self) -> list[str]:
        # Written with the RNG states, which a model-only checkpoint does not save.
        if self.args.save_only_model:
            return super()._checkpoint_files()
        own = [SELECTION_RNG_FILE.format(process_index=index) for index in range(self.args.world_size)]
        return [*super()._checkpoint_files(), *own]

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SELECTION_RNG_FILE.format(process_index=self.args.process_index))
        if os.path.isfile(path):
            self._selection_generator.set_state(torch.load(path, weights_only=True))
        elif self.token_selection in ("random", "entropy_sample"):
            warnings.warn(
                f"{checkpoint} holds no token-selection generator state for process {self.args.process_index} "
                f"({os.path.basename(path)}); token_selection={self.token_selection!r} resumes with a fresh stream, "
                "so the run will not repeat the uninterrupted one.",
                stacklevel=2,
            )

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
        """
        TRL's `_compute_loss` with the divergence taken on the kept tokens only: `Σ_kept divergence /
        num_items_in_batch`, where `num_items_in_batch` counts kept tokens (see [`~TipDistillTrainer.compute_loss`]).
        """
        with divergence_loss_replaced_by(self._selective_divergence_loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        The TIP loss, the paper's: the mean divergence over the **kept** tokens of the generation batch; with a guard
        that refuses to step on a non-finite loss, and the `tip/*` metrics.

        Normalisation convention: `num_items_in_batch` is the number of kept tokens of the whole generation batch (all
        accumulation steps and processes), which `_generate_and_score_completions` writes into
        `inputs["num_items_in_batch"]` and TRL's `compute_loss` reads in training, in place of TRL's count of all
        completion tokens. So the loss and its gradient do not shrink with `token_ratio`, and logged losses compare
        across ratios. A `num_items_in_batch` that counts all completion tokens, as TRL means it, would give the sum
        over kept tokens divided by all tokens: about `token_ratio` times this loss. With `token_selection="all"` the
        two counts are the same and the loss is TRL's, bit for bit. In evaluation (`num_items_in_batch=None`) the
        loss is the mean over the micro-batch's kept tokens.
        """
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
        n_valid, n_kept, h_all, h_kept, d_all, d_kept, *quadrants = sums[:10]
        # δ̂ quantiles are per micro-batch (the scope soft-OR normalises over): averaged over the processes that had one.
        hat_p50, hat_p90, with_hat = sums[10:]
        metrics = self._metrics[mode]
        metrics["tip/kept_fraction"].append(n_kept / n_valid if n_valid else 0.0)
        metrics["tip/entropy_all"].append(h_all / n_valid if n_valid else 0.0)
        metrics["tip/entropy_kept"].append(h_kept / n_kept if n_kept else 0.0)
        metrics["tip/divergence_kept"].append(d_kept / n_kept if n_kept else 0.0)
        if not self._scores_student_first:
            # The entropy-only rules never score the divergence of unkept tokens.
            metrics["tip/divergence_all"].append(d_all / n_valid if n_valid else 0.0)
            for name, count in zip(("q1", "q2", "q3", "q4"), quadrants, strict=True):
                metrics[f"tip/{name}_share"].append(count / n_valid if n_valid else 0.0)
        if with_hat:
            metrics["tip/divergence_hat_p50"].append(hat_p50 / with_hat)
            metrics["tip/divergence_hat_p90"].append(hat_p90 / with_hat)
        return output

    @staticmethod
    def _divergence_hat_spread(divergence_hat, mask) -> torch.Tensor:
        # [median, 90th percentile, 1] of soft-OR's δ̂ over the micro-batch's completion tokens; zeros when there is none.
        if divergence_hat is None or not mask.any():
            return torch.zeros(3)
        values = divergence_hat[mask].float()
        return torch.stack([quantile(values, 0.5), quantile(values, 0.9), torch.ones((), device=values.device)]).cpu()

    def _selective_divergence_loss(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same signature and return value as TRL's `_chunked_divergence_loss`; see `divergence_loss_replaced_by`.
        result = selective_divergence_loss(
            *args,
            method=self.token_selection,
            ratio=self.token_ratio,
            entropy_clip_quantile=self.entropy_clip_quantile,
            generator=self._selection_generator,
            divergence_clip_quantile=self.divergence_clip_quantile,
            selection_divergence=self.selection_divergence,
            vocab_size=self.shared_vocab_size,
            **kwargs,
        )
        mask, keep, entropy, reverse_kl = result.mask, result.keep, result.entropy, result.reverse_kl
        with torch.no_grad():
            # Under the entropy-only rules the divergence exists on kept tokens only (NaN elsewhere): the sums over
            # all tokens are placeholders, not logged (see `compute_loss`).
            scored_everywhere = not self._scores_student_first
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
                    self._divergence_hat_spread(result.divergence_hat, mask).to(entropy.device),
                ]
            )
        return result.loss, result.entropy_sum, result.num_valid
