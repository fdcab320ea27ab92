"""The trainers' side of a served teacher: connecting at init, scoring each generation batch, the logit scale."""

from __future__ import annotations

from typing import Any

from ..served_teacher import ServedTeacher


# The keys under which a generation batch carries the served teacher's log-probabilities, in the order of
# `ServedTeacherLogprobs`'s fields.
SERVED_KEYS = ("served_topk_ids", "served_topk_logprobs", "served_sampled_logprobs")


def connect_served_teacher(model, teacher_model, args, processing_class) -> ServedTeacher | None:
    """
    The client of the teacher server `args.teacher_model_server_url` (`None` without one), built before any model is
    loaded: an unreachable server, or one whose tokenizer is not the student's (unless `check_teacher_tokenizer` is
    off), fails here, naming the URL.
    """
    url = getattr(args, "teacher_model_server_url", None)
    if url is None:
        return None
    if teacher_model is not None:
        raise ValueError(
            f"teacher_model_server_url={url!r} serves the teacher, so no teacher model is loaded in the trainer; do "
            "not pass `teacher_model` as well."
        )
    served = ServedTeacher(
        url, timeout=args.teacher_server_timeout, retries=args.teacher_server_retries,
        backoff=args.teacher_server_backoff,
    )
    if getattr(args, "check_teacher_tokenizer", True):
        tokenizer = processing_class
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = model if isinstance(model, str) else getattr(model, "name_or_path", None)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        served.check_tokenizer(tokenizer)
    return served


def served_teacher_logprobs(trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """The served teacher's log-probabilities of a generation batch's completions, under [`SERVED_KEYS`]."""
    logprobs = trainer.served_teacher.sequence_logprobs(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"],
        top_k=trainer.args.loss_top_k,
        temperature=trainer.temperature,
        step=trainer.state.global_step + 1,
    )
    return dict(zip(SERVED_KEYS, (logprobs.topk_ids, logprobs.topk_logprobs, logprobs.sampled_logprobs), strict=True))


def student_logit_scale(config) -> float:
    """The multiplier of a model's logits, read from its text config as TRL's distillation loss reads it."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else scale
