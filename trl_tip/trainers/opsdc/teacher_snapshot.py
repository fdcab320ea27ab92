"""
OPSDC's teacher: a frozen snapshot θ̄ of the student, hard-refreshed from it every `teacher_refresh_steps` optimiser
steps, and saved with every checkpoint.

A PEFT student's teacher is a second, frozen adapter on the same base weights ([`_AdapterSnapshot`]; a refresh copies
the adapter weights); any other student's is a full frozen copy, sharded like the student.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import sys
import weakref
from typing import TYPE_CHECKING

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ...resume import atomic_path
from ...sharding import copy_into_, full_copy, is_deepspeed_zero3, is_sharded, prepare_frozen_model


if TYPE_CHECKING:
    from .opsdc_trainer import OPSDCTrainer


logger = get_logger(__name__)

TEACHER_ADAPTER_NAME = "opsdc_teacher"
TEACHER_SNAPSHOT_NAME = "opsdc_teacher.safetensors"
OPSDC_STATE_NAME = "opsdc_state.json"


def adapter_snapshot_pairs(
    peft_model: nn.Module, source_adapter: str, target_adapter: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """
    Match every parameter of PEFT adapter `target_adapter` with the parameter of `source_adapter` at the same place.

    PEFT names adapter weights with the adapter name as one segment (`...q_proj.lora_A.default.weight`,
    `...modules_to_save.default.weight`), so the counterpart is found by swapping that segment.

    Returns:
        `list[tuple[str, torch.Tensor, torch.Tensor]]`: `(target name, target parameter, source parameter)`.
    """
    parameters = dict(peft_model.named_parameters())
    target_marker, source_marker = f".{target_adapter}.", f".{source_adapter}."
    pairs = []
    for name, target in parameters.items():
        if target_marker not in name:
            continue
        source_name = name.replace(target_marker, source_marker)
        if source_name not in parameters:
            raise RuntimeError(f"Adapter weight {name!r} has no counterpart {source_name!r} in the model.")
        pairs.append((name, target, parameters[source_name]))
    if not pairs:
        raise RuntimeError(f"The model holds no weights of adapter {target_adapter!r}.")
    return pairs


def module_snapshot_pairs(target: nn.Module, source: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """
    Match every parameter and buffer of `target` with the one of the same name in `source` (a copy of the same model).

    Returns:
        `list[tuple[str, torch.Tensor, torch.Tensor]]`: `(name, target tensor, source tensor)`.
    """
    target_tensors = dict(itertools.chain(target.named_parameters(), target.named_buffers()))
    source_tensors = dict(itertools.chain(source.named_parameters(), source.named_buffers()))
    if target_tensors.keys() != source_tensors.keys():
        missing = sorted(source_tensors.keys() - target_tensors.keys())[:5]
        extra = sorted(target_tensors.keys() - source_tensors.keys())[:5]
        raise RuntimeError(f"The teacher copy no longer matches the student (missing {missing}, extra {extra}).")
    return [(name, tensor, source_tensors[name]) for name, tensor in target_tensors.items()]


@torch.no_grad()
def copy_snapshot_(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """Copy each source tensor into its target, in place (a hard refresh θ̄ ← θ)."""
    for name, target, source in pairs:
        # `ds_shape`: a ZeRO-3 parameter's own shape is that of its (empty) gathered placeholder.
        target_shape = getattr(target, "ds_shape", target.shape)
        source_shape = getattr(source, "ds_shape", source.shape)
        if target_shape != source_shape:
            raise RuntimeError(f"Cannot refresh {name!r}: shape {tuple(target_shape)} vs {tuple(source_shape)}.")
        # Each rank copies its own shards when both are sharded (ZeRO-3, FSDP2): no gather, no full copy anywhere.
        copy_into_(target, source, name)


def _bnb_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit linear layers of `model` (none when bitsandbytes was never imported)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    linear_4bit = getattr(bnb_nn, "Linear4bit", None)
    if linear_4bit is None:
        return []
    return [module for module in model.modules() if isinstance(module, linear_4bit)]


class _AdapterSnapshot(nn.Module):
    """
    The teacher of a PEFT student: a frozen adapter on the student's own base model, seen by TRL as a model.

    It owns no parameters. The base model and both adapters belong to the student, and are kept out of this module's
    children so that nothing done to the teacher (`eval()`, device moves, parameter counts) reaches the student.
    """

    def __init__(self, peft_model: nn.Module, adapter_name: str):
        super().__init__()
        self.__dict__["peft_model"] = peft_model
        self.__dict__["quantized_layers"] = _bnb_4bit_layers(peft_model)
        self.adapter_name = adapter_name

    @property
    def config(self):
        return self.peft_model.config

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    @contextlib.contextmanager
    def active(self):
        """Run the shared model as the teacher (snapshot adapter active, frozen, no dropout), then restore it."""
        model = self.peft_model
        previous_adapter, was_training = model.active_adapter, model.training
        model.set_adapter(self.adapter_name, inference_mode=True)
        model.eval()
        # The 4-bit base layers are the student's too: they stay in training mode. In eval mode, on a CPU with
        # AVX512-BF16, bitsandbytes takes a no-grad forward for inference and repacks the weights in place into a
        # layout whose kernel has no backward, so the student's next forward with gradients (the checkpointed
        # recomputation in this step's backward, or the next step) fails. Their mode selects a kernel only (they have
        # no dropout), and in training mode the teacher computes with the same kernel as the student.
        for layer in self.quantized_layers:
            layer.train()
        try:
            yield model
        finally:
            # `set_adapter` makes the restored adapter trainable again and freezes every other one.
            model.set_adapter(previous_adapter)
            model.train(was_training)


class _TeacherRefreshCallback(TrainerCallback):
    """Refreshes the teacher right after every `teacher_refresh_steps`-th optimiser step, before any checkpoint."""

    def __init__(self, trainer: OPSDCTrainer):
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and state.global_step % args.teacher_refresh_steps == 0:
            trainer.refresh_teacher()


class TeacherSnapshotMixin:
    """
    The teacher snapshot of an [`OPSDCTrainer`]: its creation, refresh, and its place in checkpoints (written with the
    optimiser, restored on resume). Mixed into the trainer before TRL's `DistillationTrainer`.
    """

    def _start_teacher(self) -> None:
        """Build the snapshot of step 0 and register its refresh; called at the end of the trainer's `__init__`."""
        self._student_adapter_name: str | None = None
        self._teacher_refreshes = 0
        self._teacher_refreshed_at_step: int | None = None
        self.teacher_model = self._create_teacher()
        if isinstance(self.teacher_model, _AdapterSnapshot):
            self.refresh_teacher()
        else:
            # A full copy is built equal to the student (under FSDP2 from rank 0's weights, which the student's own
            # sharding broadcasts too): it is the snapshot of step 0.
            self._record_refresh()
        # First in line, so that every other callback's `on_step_end` (logging, checkpoints, the user's) sees the
        # teacher of the step that just ended.
        self.callback_handler.callbacks.insert(0, _TeacherRefreshCallback(self))

    def _create_teacher(self) -> nn.Module:
        student = self.accelerator.unwrap_model(self.model)
        if is_peft_model(student):
            active_adapters = student.active_adapters
            if len(active_adapters) != 1:
                raise ValueError(f"OPSDCTrainer needs exactly one active adapter, got {active_adapters}.")
            self._student_adapter_name = active_adapters[0]
            if TEACHER_ADAPTER_NAME in student.peft_config:
                raise ValueError(
                    f"The model already has an adapter named {TEACHER_ADAPTER_NAME!r}, which OPSDCTrainer reserves "
                    "for the teacher snapshot. Pass a model without it."
                )
            if hasattr(student.get_output_embeddings(), "modules_to_save"):
                raise ValueError(
                    "The PEFT config trains `lm_head` (modules_to_save), but the distillation loss reads the output "
                    "head outside the adapter switch, so the teacher would score with the student's head. Remove "
                    "`lm_head` from `modules_to_save`."
                )
            student.add_adapter(TEACHER_ADAPTER_NAME, copy.deepcopy(student.peft_config[self._student_adapter_name]))
            for _, teacher_weight, student_weight in adapter_snapshot_pairs(
                student, self._student_adapter_name, TEACHER_ADAPTER_NAME
            ):
                # PEFT may create the new adapter in float32 next to a bfloat16 student adapter (QLoRA): match it, so
                # a refreshed teacher computes exactly what the student did.
                teacher_weight.data = teacher_weight.data.to(student_weight.dtype)
                teacher_weight.requires_grad_(False)
            return _AdapterSnapshot(student, TEACHER_ADAPTER_NAME)

        if is_deepspeed_zero3(self.accelerator) and any(hasattr(p, "ds_id") for p in student.parameters()):
            # Loaded partitioned (`zero.Init`): a deep copy would copy empty partitions. The same architecture built
            # partitioned the same way holds the same slices on every rank; copying them is the snapshot. Done
            # before the engine starts, which gathers the persistent parameters from these partitions.
            # Its random initialisation (overwritten at once) must not advance the generator that generation samples
            # from, so that ZeRO-3 runs sample what DDP runs do.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                teacher = type(student)._from_config(student.config, dtype=next(student.parameters()).dtype)
            teacher.requires_grad_(False)
            copy_snapshot_(module_snapshot_pairs(teacher, student))
        else:
            teacher = copy.deepcopy(student)
            teacher.requires_grad_(False)
        teacher.eval()
        # Sharded like the student: partitioned under ZeRO-3, `fully_shard`-ed per block under FSDP2.
        return prepare_frozen_model(teacher, self.accelerator)

    def _snapshot_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        if isinstance(self.teacher_model, _AdapterSnapshot):
            return adapter_snapshot_pairs(
                self.teacher_model.peft_model, self._student_adapter_name, self.teacher_model.adapter_name
            )
        return module_snapshot_pairs(
            self.accelerator.unwrap_model(self.teacher_model), self.accelerator.unwrap_model(self.model)
        )

    @property
    def teacher_refreshes(self) -> int:
        """Number of snapshots taken so far, including the one at step 0."""
        return self._teacher_refreshes

    def refresh_teacher(self) -> None:
        """Hard-copy the student's current weights into the teacher snapshot (θ̄ ← θ)."""
        copy_snapshot_(self._snapshot_pairs())
        self._record_refresh()

    def _record_refresh(self) -> None:
        self._teacher_refreshes += 1
        self._teacher_refreshed_at_step = self.state.global_step
        self._metrics["train"]["opsdc/teacher_refreshes"] = [float(self._teacher_refreshes)]

    def save_teacher_snapshot(self, directory: str) -> None:
        """
        Write the teacher snapshot and the OPSDC bookkeeping (refresh count, length baseline) to `directory`.

        Under ZeRO-3 or FSDP2 every rank must call it: the snapshot is gathered one tensor at a time, and the main
        process writes it.
        """
        tensors = {}
        for name, teacher, _ in self._snapshot_pairs():
            full = full_copy(teacher)
            if self.args.should_save:
                tensors[name] = full.cpu().contiguous()
        if not self.args.should_save:
            return
        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, TEACHER_SNAPSHOT_NAME)) as temporary:
            save_file(tensors, temporary, metadata={"format": "pt"})
        state = {
            "teacher_refreshes": self._teacher_refreshes,
            "teacher_refreshed_at_step": self._teacher_refreshed_at_step,
            "teacher_refresh_steps": self.args.teacher_refresh_steps,
            "length_baseline_sum": self._length_baseline[0],
            "length_baseline_count": self._length_baseline[1],
        }
        with atomic_path(os.path.join(directory, OPSDC_STATE_NAME)) as temporary, open(temporary, "w") as file:
            json.dump(state, file, indent=2)

    def load_teacher_snapshot(self, directory: str) -> None:
        """Restore what [`save_teacher_snapshot`] wrote, so training continues with the same teacher."""
        snapshot_path = os.path.join(directory, TEACHER_SNAPSHOT_NAME)
        if not os.path.isfile(snapshot_path):
            logger.warning(
                f"{directory} holds no OPSDC teacher snapshot ({TEACHER_SNAPSHOT_NAME}); the teacher restarts as a "
                "copy of the resumed student."
            )
            self.refresh_teacher()
            return
        saved = load_file(snapshot_path)
        pairs = self._snapshot_pairs()
        expected = {name for name, _, _ in pairs}
        if saved.keys() != expected:
            missing, unexpected = sorted(expected - saved.keys())[:5], sorted(saved.keys() - expected)[:5]
            raise ValueError(
                f"The teacher snapshot in {directory} does not match this model (missing {missing}, unexpected "
                f"{unexpected}); resume with the model and PEFT config the checkpoint was trained with."
            )
        with torch.no_grad():
            for name, teacher, _ in pairs:
                copy_into_(teacher, saved[name], name)
        state_path = os.path.join(directory, OPSDC_STATE_NAME)
        if os.path.isfile(state_path):
            with open(state_path) as file:
                state = json.load(file)
            self._teacher_refreshes = state["teacher_refreshes"]
            self._teacher_refreshed_at_step = state["teacher_refreshed_at_step"]
            self._length_baseline = [state["length_baseline_sum"], state["length_baseline_count"]]

    # ---- Checkpoints ----

    def _save_optimizer_and_scheduler(self, output_dir):
        # Every process comes through here (a sharded snapshot is gathered by all of them), within the checkpoint's
        # save and before transformers writes the trainer state that marks the checkpoint complete.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save or is_sharded(self.accelerator):
            self.save_teacher_snapshot(output_dir)

    def _checkpoint_files(self) -> list[str]:
        if self.args.save_only_model:  # saved with the optimizer, which a model-only checkpoint does not save
            return super()._checkpoint_files()
        return [*super()._checkpoint_files(), TEACHER_SNAPSHOT_NAME, OPSDC_STATE_NAME]

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every resume path (DeepSpeed included, which skips `_load_from_checkpoint`) comes through here, after the
        # student's weights are loaded.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_teacher_snapshot(checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        if self._student_adapter_name is None:
            return super()._save(output_dir, state_dict)
        # `PeftModel.save_pretrained` writes every adapter the model holds; the saved model is the student's adapter
        # only (checkpoints get the teacher separately, see `_save_optimizer_and_scheduler`).
        peft_model = self.accelerator.unwrap_model(self.model)
        save_pretrained = peft_model.save_pretrained

        def save_student_adapter(*args, **kwargs):
            kwargs.setdefault("selected_adapters", [self._student_adapter_name])
            return save_pretrained(*args, **kwargs)

        peft_model.save_pretrained = save_student_adapter
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del peft_model.save_pretrained
