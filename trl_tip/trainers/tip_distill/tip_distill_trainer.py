"""TIP: on-policy distillation that trains only on the tokens that matter."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from trl import DistillationTrainer

from ..._trl_compat import divergence_loss_replaced_by, platform_vllm_generation
from ...hub import TrlTipHubMixin
from ...losses import STUDENT_SIDE_METHODS, selective_divergence_loss
from ...quantization import keep_4bit_weights_trainable
from ...resume import ResumableTrainerMixin, atomic_path
from ...served_loss import ServedTeacherLogprobs, selective_sparse_divergence_loss
from ...selection import quadrant_counts, quantile, tokens_per_rollout
from ...sharding import fsdp2_shard_for_inference, is_fsdp2
from ...vocabulary import compare_tokenizers, shared_vocab_size, tokenizer_of
from .._inputs import check_prompts, check_sampling, default_config, model_written_mask
from .._served import SERVED_KEYS, connect_served_teacher, served_teacher_logprobs, student_logit_scale
from .teacher_loading import (
    _is_quantized,
    _load_teacher_tokenizer,
    _teacher_init_kwargs,
    _vocab_check_passed,
    _vocab_rows,
)
from .tip_distill_config import TipDistillConfig


# The token-selection generator's state, one file per process, saved in each checkpoint next to transformers' RNG files.
SELECTION_RNG_FILE = "tip_selection_rng_{process_index}.pth"


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
        # A served teacher: connected and checked against the student's tokenizer before anything is loaded.
        served_teacher = connect_served_teacher(model, teacher_model, args, processing_class)
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
        self.served_teacher = served_teacher
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
        if self.served_teacher is not None:
            # The served teacher scores the whole generation batch in one request; its log-probabilities travel with
            # the rows through TRL's shuffling and splitting. A failure here stops training before any step on it.
            output.update(served_teacher_logprobs(self, output))
        if self.token_selection != "all":
            # The loss is normalised by the number of kept tokens over the whole generation batch (all accumulation
            # steps, all processes), as TRL normalises by all tokens. Each rollout keeps max(1, ⌊ρ·m_i⌋) tokens, so the
            # count follows from the completion lengths and is known here, before any loss is computed.
            kept = tokens_per_rollout(model_written_mask(output), self.token_ratio).sum()
            output["num_items_in_batch"] = self.accelerator.gather(kept).sum()
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """
        TRL's `_compute_loss` with the divergence taken on the kept tokens only: `Σ_kept divergence /
        num_items_in_batch`, where `num_items_in_batch` counts kept tokens (see [`~TipDistillTrainer.compute_loss`]).
        """
        if self.served_teacher is not None:
            return self._served_compute_loss(unwrapped_student, inputs, num_items_in_batch)
        with divergence_loss_replaced_by(self._selective_divergence_loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def _served_compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's `_compute_loss` without the teacher's forward: the student's last hidden states, then the selective
        # divergence against the served teacher's sparse log-probabilities that came with the batch.
        if any(key in inputs for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask")):
            raise ValueError("A served teacher scores text sequences only; multimodal inputs need a local teacher.")
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completion_ids.size(1))
        head = unwrapped_student.get_output_embeddings()
        config = unwrapped_student.config.get_text_config()
        device = head.weight.device
        teacher = ServedTeacherLogprobs(*(inputs[key].to(device) for key in SERVED_KEYS))
        result = selective_sparse_divergence_loss(
            hidden.to(device),
            head.weight,
            completion_ids.to(device),
            model_written_mask(inputs).to(device),
            teacher,
            self.beta,
            num_items_in_batch=num_items_in_batch,
            student_lm_head_bias=head.bias,
            student_logit_scale=student_logit_scale(config),
            student_final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
            temperature=self.temperature,
            **self._selection_kwargs(),
        )
        self._record_selection(result)
        return result.loss, result.entropy_sum.detach(), result.num_valid

    def _selection_kwargs(self) -> dict[str, Any]:
        # The selection arguments both losses take (PACED adds its rollout weights).
        return {
            "method": self.token_selection,
            "ratio": self.token_ratio,
            "entropy_clip_quantile": self.entropy_clip_quantile,
            "generator": self._selection_generator,
            "divergence_clip_quantile": self.divergence_clip_quantile,
            "selection_divergence": self.selection_divergence,
        }

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
            **self._selection_kwargs(),
            vocab_size=self.shared_vocab_size,
            **kwargs,
        )
        self._record_selection(result)
        return result.loss, result.entropy_sum, result.num_valid

    def _record_selection(self, result) -> None:
        # The sums behind the `tip/*` metrics, logged by `compute_loss` after the wrapped forward returns.
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
