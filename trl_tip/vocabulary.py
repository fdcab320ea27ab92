"""Does a teacher read the student's token ids? Tokenizer comparison and the shared vocabulary of padded heads.

Distillation compares two next-token distributions id by id, so it is meaningful only when id `k` is the same token for
both models. Equal `vocab_size` does not guarantee it (two tokenizers of one size can map the same text to other ids),
and unequal `vocab_size` does not rule it out: Qwen2.5-14B and Qwen2.5-1.5B share one tokenizer of 151,665 tokens but
pad their `lm_head` to 152,064 and 151,936 rows. The rows past the tokenizer are padding no text ever maps to, so the
two models are compared over the rows the tokenizer can produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


_PROBE = "trl-tip end-of-turn probe"
# Special-token attributes compared for information only: the teacher scores the ids the student's tokenizer produced
# and the student wrote, so none of them changes which token an id is.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
# How many of the tokens one tokenizer has past the other's a note names.
_NAMED_EXTRA_TOKENS = 4


def tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer of a tokenizer or of a multimodal processor (`processor.tokenizer`)."""
    return getattr(processing_class, "tokenizer", processing_class)


def end_of_turn_token(tokenizer: Any) -> str | None:
    """
    The token a tokenizer's chat template writes right after an assistant message (e.g. `<|im_end|>` for ChatML), or
    `None` when the tokenizer has no chat template or the template writes no special token there.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe has no end-of-turn token to compare
        return None
    tail = text[text.rfind(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    specials = sorted(
        {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
        | {str(token) for token in getattr(tokenizer, "added_tokens_encoder", {})},
        key=len,
        reverse=True,
    )
    first = None
    for token in specials:
        position = tail.find(token)
        if position >= 0 and (first is None or position < first[0]):
            first = (position, token)
    return None if first is None else first[1]


@dataclass(frozen=True)
class TokenizerComparison:
    """
    What [`compare_tokenizers`] found.

    Attributes:
        error (`str` or `None`): the first difference that makes the teacher score other tokens than the student
            wrote (an id that is another token for each, or another end-of-turn token), or `None`.
        notes (`tuple[str, ...]`): differences that leave every id both tokenizers have the same token: special-token
            attributes (bos, eos, pad, unk) and tokens one tokenizer has past the other's.
    """

    error: str | None = None
    notes: tuple[str, ...] = ()


def _tokens_by_id(tokenizer: Any) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def _special_token(tokenizer: Any, name: str) -> tuple[str | None, int | None]:
    token = getattr(tokenizer, name, None)
    return (None if token is None else str(token)), getattr(tokenizer, f"{name}_id", None)


def compare_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> TokenizerComparison:
    """
    Compare what decides whether a teacher scores the tokens a student wrote: the token of every id both tokenizers
    have, and, when both have a chat template, the token it ends an assistant turn with ([`end_of_turn_token`]).

    Tokens past the shorter tokenizer (added at the end of one, as instruct models add chat tokens to their base's
    vocabulary) and special-token attributes (a base model's eos `<|endoftext|>` against its instruct sibling's
    `<|im_end|>`; an `unk_token` one tokenizer class sets by default) are notes, not errors: the prompts are tokenized
    by the student's tokenizer only, so no id changes its token. Whether both `lm_head`s can score every token is
    checked separately ([`shared_vocab_size`]).

    Args:
        student_tokenizer, teacher_tokenizer: tokenizers (or processors holding one).

    Returns:
        [`TokenizerComparison`]: e.g. the error `"id 1037 is 'ĠTheir' for the student but 'ĠThe' for the teacher"`.
    """
    student, teacher = tokenizer_of(student_tokenizer), tokenizer_of(teacher_tokenizer)
    student_by_id, teacher_by_id = _tokens_by_id(student), _tokens_by_id(teacher)
    student_size, teacher_size = len(student), len(teacher)
    sizes = f"vocab_size {student_size} for the student, {teacher_size} for the teacher"
    for index in range(min(student_size, teacher_size)):
        s_token, t_token = student_by_id.get(index), teacher_by_id.get(index)
        if s_token != t_token:
            error = f"id {index} is {s_token!r} for the student but {t_token!r} for the teacher"
            return TokenizerComparison(error=error if student_size == teacher_size else f"{error} ({sizes})")
    s_end, t_end = end_of_turn_token(student), end_of_turn_token(teacher)
    if s_end is not None and t_end is not None and s_end != t_end:
        return TokenizerComparison(
            error=f"the chat template ends a turn with {s_end!r} for the student but {t_end!r} for the teacher"
        )

    notes = []
    if student_size != teacher_size:
        longer, tokens = ("teacher", teacher_by_id) if teacher_size > student_size else ("student", student_by_id)
        extra = range(min(student_size, teacher_size), max(student_size, teacher_size))
        named = ", ".join(repr(tokens.get(index)) for index in extra[:_NAMED_EXTRA_TOKENS])
        more = ", ..." if len(extra) > _NAMED_EXTRA_TOKENS else ""
        notes.append(
            f"the {longer}'s tokenizer has {len(extra)} token(s) past the other's ({sizes}): ids {extra[0]}-"
            f"{extra[-1]} ({named}{more}); every shared id is the same token"
        )
    for name in _SPECIAL_TOKEN_NAMES:
        (s_token, s_id), (t_token, t_id) = _special_token(student, name), _special_token(teacher, name)
        if name == "unk_token" and (s_token is None or t_token is None):
            # A tokenizer without an unknown token (byte-level BPE) never writes one; the other's is a class default.
            continue
        if (s_token, s_id) != (t_token, t_id):
            notes.append(
                f"{name} is {s_token!r} (id {s_id}) for the student but {t_token!r} (id {t_id}) for the teacher"
            )
    return TokenizerComparison(notes=tuple(notes))


def shared_vocab_size(student_rows: int, teacher_rows: int, num_tokens: int) -> int | None:
    """
    How many `lm_head` rows the divergence compares: `None` (all of them, as TRL) when both heads have the same number
    of rows, else the tokenizer's `num_tokens` (the rows any text can map to), which both heads must cover.

    Raises:
        ValueError: when the heads differ and one of them has fewer rows than the tokenizer has tokens.
    """
    if student_rows == teacher_rows:
        return None
    if num_tokens > min(student_rows, teacher_rows):
        raise ValueError(
            f"The student's lm_head has {student_rows} rows (vocab_size) and the teacher's {teacher_rows}, and the "
            f"tokenizer has {num_tokens} tokens: one head cannot score every token, so the models do not share a "
            "vocabulary. Use a teacher with the student's tokenizer, or GOLD for cross-tokenizer distillation."
        )
    return num_tokens
