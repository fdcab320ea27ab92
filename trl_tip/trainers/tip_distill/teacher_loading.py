"""
How TIP loads a teacher given by path: quantised on request, and with its vocabulary checked against the student's
(teachers whose `lm_head` is padded to another size are compared over the rows both tokenizers can produce).
"""

from __future__ import annotations

import contextlib

import torch

from ..._trl_compat import models_loaded_by_path_passed_to
from .tip_distill_config import teacher_quantization_config


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
