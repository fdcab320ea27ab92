"""Resuming every trl_tip trainer exactly, and only from checkpoints that were saved whole.

Two things stand between a checkpoint and a run that continues as if it had never stopped:

- **The data order.** TRL's `RepeatSampler` draws each epoch's permutation from one generator seeded once, so epoch
  `e` is its `(e + 1)`-th draw; a resumed process starts a fresh generator, and transformers fast-forwards the
  dataloader by batches within the resumed epoch only. A run resumed at or after an epoch end would replay epoch 0's
  order. [`EpochSeededRepeatSampler`] makes the order a function of the seed and the epoch (transformers calls
  `set_epoch` on the sampler at the start of every epoch), and draws exactly what TRL's sampler draws in an
  uninterrupted run.
- **Cut-off saves.** A process stopped while it saves (a SIGTERM, a full disk) can leave a `checkpoint-N` folder with
  only part of its files; transformers' `resume_from_checkpoint=True` takes the highest-numbered folder whatever it
  holds. [`last_complete_checkpoint`] skips such folders. transformers writes `trainer_state.json` after the model,
  optimizer, scheduler and RNG states, and the trainers write their own files (PACED's pass-rate table, TIP's selection
  generator, OPSDC's teacher snapshot) before it, each under a temporary name renamed into place
  ([`atomic_path`]), so a folder is complete when its state file reads as JSON and every file the trainer expects is
  there.

[`ResumableTrainerMixin`] wires both into a trainer; every trl_tip trainer has it first in its bases.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler


TRAINER_STATE_FILE = "trainer_state.json"
# What transformers (and DeepSpeed, FSDP, PEFT) write as a checkpoint's model weights; one of them must be there.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_model_fsdp.bin",
)
# Folders that hold weights: FSDP's sharded state dicts (`pytorch_model_fsdp_0`) and DeepSpeed's engine state
# (`global_step12`).
_WEIGHT_FOLDER = re.compile(r"^(pytorch_model_fsdp|global_step)")
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")


class EpochSeededRepeatSampler(RepeatSampler):
    """
    TRL's [`~trl.trainer.utils.RepeatSampler`] whose shuffled order depends on the seed and the epoch only.

    Epoch `e` (set by `set_epoch`, which transformers calls at the start of every epoch) yields the `(e + 1)`-th
    permutation of a generator seeded with the sampler's seed: exactly what `RepeatSampler` yields on its `(e + 1)`-th
    pass in one process, so an uninterrupted run is unchanged, and a run resumed in any epoch draws that epoch's
    order instead of epoch 0's. The arguments are `RepeatSampler`'s.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0
        # `RepeatSampler` leaves an unseeded generator at torch's default seed; either way this is where it started.
        self._initial_seed = self.generator.initial_seed() if self.shuffle else None

    @classmethod
    def from_sampler(cls, sampler: RepeatSampler) -> EpochSeededRepeatSampler:
        """The epoch-seeded counterpart of a `RepeatSampler`, with the same data, repeats, batch size and seed."""
        return cls(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            # Replay the permutations of the epochs before this one, so `RepeatSampler` draws this epoch's.
            self.generator.manual_seed(self._initial_seed)
            for _ in range(self.epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        yield from super().__iter__()


def epoch_seeded(sampler: Sampler) -> Sampler:
    """`sampler` with an epoch-seeded order when it is TRL's `RepeatSampler`; any other sampler as it is."""
    if type(sampler) is RepeatSampler:
        return EpochSeededRepeatSampler.from_sampler(sampler)
    return sampler


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """
    A temporary path beside `path` to write to; renamed to `path` when the block ends without error, removed when it
    fails. A process stopped mid-write leaves `path` as it was (absent, or its previous version), never half-written.

    Example:

    ```python
    >>> with atomic_path("checkpoint-2/state.json") as temporary, open(temporary, "w") as file:
    ...     json.dump(state, file)
    ```
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.partial-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def checkpoint_problem(directory: str | os.PathLike, required_files: Sequence[str] = ()) -> str | None:
    """
    Why a checkpoint folder cannot be resumed from, or `None` when it was saved whole: it needs a `trainer_state.json`
    that reads as JSON (transformers writes it after everything else), model weights, and each of `required_files`
    (the trainer's own files, relative to the folder).
    """
    directory = os.fspath(directory)
    state_path = os.path.join(directory, TRAINER_STATE_FILE)
    if not os.path.isfile(state_path):
        return f"it has no {TRAINER_STATE_FILE}"
    try:
        with open(state_path, encoding="utf-8") as file:
            json.load(file)
    except (ValueError, UnicodeDecodeError):
        return f"its {TRAINER_STATE_FILE} is cut off"
    entries = os.listdir(directory)
    has_weights = any(name in entries for name in _WEIGHT_FILES) or any(
        _WEIGHT_FOLDER.match(name) or os.path.isfile(os.path.join(directory, name, "adapter_model.safetensors"))
        for name in entries
        if os.path.isdir(os.path.join(directory, name))
    )
    if not has_weights:
        return "it has no model weights"
    missing = [name for name in required_files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        return f"it has no {', '.join(missing)}"
    return None


def last_complete_checkpoint(
    output_dir: str | os.PathLike, required_files: Sequence[str] = ()
) -> tuple[str | None, list[tuple[str, str]]]:
    """
    The highest-numbered `checkpoint-N` folder of `output_dir` that [`checkpoint_problem`] finds complete.

    Returns:
        `tuple[str | None, list[tuple[str, str]]]`: its path (`None` when there is none), and the folders of higher
        step skipped on the way, each with what is wrong with it.
    """
    output_dir = os.fspath(output_dir)
    numbered = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            numbered.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path, required_files)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


class ResumableTrainerMixin:
    """
    Exact and robust resumption for a TRL trainer; place it first in the bases.

    - The training sampler is TRL's, made epoch-seeded ([`EpochSeededRepeatSampler`]), so a run resumed at any step,
      an epoch end included, continues on the order of the uninterrupted run.
    - `train(resume_from_checkpoint=True)` resumes from the last checkpoint saved whole ([`last_complete_checkpoint`]),
      with a warning naming each newer folder it skips, instead of failing on a folder a cut-off save left behind.

    Subclasses list the files of their own that a checkpoint must hold in `_checkpoint_files`.
    """

    def _get_train_sampler(self, dataset=None):
        return epoch_seeded(super()._get_train_sampler(dataset))

    def _checkpoint_files(self) -> list[str]:
        """The trainer's own files (names within a checkpoint folder) without which a checkpoint is incomplete."""
        return []

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir
            resume_from_checkpoint, skipped = last_complete_checkpoint(output_dir, self._checkpoint_files())
            for path, problem in skipped:
                warnings.warn(
                    f"Skipping {path} when resuming: {problem} (a save that was cut off). Resuming from "
                    f"{resume_from_checkpoint or 'nothing'} instead.",
                    stacklevel=2,
                )
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint"
                    + (f" ({len(skipped)} cut off, see the warnings)" if skipped else "")
                    + ". Train from scratch (resume_from_checkpoint=None) or pass a checkpoint's path."
                )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
