"""Teacher prompts that differ from the student's: shared by the trainers whose teacher reads its own prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import pad


def pad_teacher_prompts(
    prompt_ids: list[torch.Tensor], pad_token_id: int, pad_to_multiple_of: int | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """
    Left-pad the teacher's prompt ids as TRL pads the student's, for the generation output dict.

    The teacher then scores `teacher_prompt_ids ⊕ completion_ids`: the completion is right after the prompt in both
    sequences, so the last `completion_length` positions of each are aligned token for token.

    Returns:
        `dict`: `teacher_prompt_ids` and `teacher_prompt_mask`, `(B, P_teacher)` each.
    """
    return {
        "teacher_prompt_ids": pad(
            prompt_ids, padding_value=pad_token_id, padding_side="left", pad_to_multiple_of=pad_to_multiple_of
        ).to(device),
        "teacher_prompt_mask": pad(
            [torch.ones_like(ids) for ids in prompt_ids],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=pad_to_multiple_of,
        ).to(device),
    }


@dataclass
class TeacherSequence:
    """
    What the teacher reads for the micro-batch in flight: its own prompt followed by the student's completion. Both
    sequences end with the same completion block, so TRL's `logits_to_keep` (the completion length) aligns the
    teacher's last positions with the student's on the completion tokens.

    A trainer builds it in `_compute_loss`, from the inputs TRL's `_get_last_hidden_state` does not receive, and reads
    it there when the model is the teacher.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def of(cls, inputs: dict) -> TeacherSequence:
        """From a batch with [`pad_teacher_prompts`]'s `teacher_prompt_ids` and `teacher_prompt_mask`."""
        return cls(
            torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1),
        )
