"""PACED: distillation weighted towards the frontier of the student's competence.

Each training problem `i` gets the weight `w_i = p_i^α (1 − p_i)^β` from the student's pass rate `p_i` (estimated from
`K` graded student rollouts), and a batch's loss is `Σ_i w_i ℓ_i / Σ_i w_i` with `ℓ_i` the token-mean divergence of
problem `i`'s completion. Problems the student always or never solves weigh nothing; the ones it sometimes solves carry
the update.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers.optimization import GreedyLR
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from ...instructions import add_privileged_context, privileged_context_setup
from ...pass_rates import INDEX_COLUMN, PassRateTable, ProblemSampler
from .._inputs import (
    check_completion_format,
    check_prompt_column,
    check_reward_columns,
    check_train_rows,
    default_config,
)
from .._rewards import resolve_reward_funcs
from .._teacher_prompts import TeacherSequence, pad_teacher_prompts
from ..tip_distill import TipDistillTrainer
from .callbacks import PassRateCallback
from .paced_config import PacedConfig
from .paced_utils import completion_ids_until_eos, paced_phase
from .pass_rate_glue import PassRateMixin


logger = get_logger(__name__)


@dataclass
class RolloutWeights:
    """
    The PACED weights of the micro-batch in flight: `weights` `(B,)`, one per rollout, and `weight_sum`, this process's
    share of their sum over the whole generation batch of every process (DDP averages gradients over processes, as
    TRL divides `num_items_in_batch` by the process count).
    """

    weights: torch.Tensor
    weight_sum: torch.Tensor


# Schedulers transformers' `Trainer` steps on evaluation metrics, not after each optimiser step.
_SCHEDULERS_STEPPED_ON_METRICS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


class _HeldOnSkippedSteps:
    """
    A learning-rate scheduler that stays where it is on the optimiser steps its trainer skips.

    transformers' `Trainer` steps `self.lr_scheduler` after every optimiser step; on a step that [`PacedTrainer`]
    skips, `step` does nothing. Everything else (`get_last_lr`, `state_dict`, `load_state_dict`, ...) is the wrapped
    scheduler's, so checkpoints are the same as without the wrapper.
    """

    def __init__(self, scheduler, step_skipped: Callable[[], bool]):
        self.scheduler = scheduler
        self._step_skipped = step_skipped

    def step(self, *args, **kwargs):
        if not self._step_skipped():
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name):
        if name == "scheduler":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class PacedTrainer(PassRateMixin, TipDistillTrainer):
    """
    Distillation weighted by the student's pass rate: PACED (distillation at the frontier of student competence).

    Before training, the student writes `K` rollouts for every training problem, the reward functions grade them, and
    each problem gets the weight `w = p^α (1 − p)^β` of its pass rate `p`. Training is TRL's distillation (the
    teacher's full next-token distribution, chunked, never materialising logits) with the batch loss
    `Σ_i w_i ℓ_i / Σ_i w_i`, `ℓ_i` being the token-mean divergence of problem `i`'s completion and `Σ w` taken over
    the whole global batch. A batch in which every weight is zero gives an exact zero loss and zero gradients.

    Tracks (see [`PacedConfig`]): on-policy reverse KL on student rollouts (default); forward KL on teacher-written
    completions (`rollout_source="teacher"`, `kl_schedule="forward"`); both in sequence (`"forward_then_reverse"`); and
    self-distillation (`self_distillation=True`, no teacher: a frozen copy of the student that reads the
    reference solution, or the answer when there is none).
    TIP token selection (`token_selection`) composes: `ℓ_i` is then the mean over the kept tokens.

    The pass-rate table is saved next to every checkpoint (`paced_pass_rates.json`), restored by
    `train(resume_from_checkpoint=...)` and exportable with [`~PacedTrainer.export_pass_rates`]. The evaluation loss is
    the unweighted divergence on student rollouts (pass rates exist for training problems only).

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]): the student, as in [`~trl.DistillationTrainer`].
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher; defaults to `args.teacher_model_name_or_path`. Must be unset with `self_distillation=True`.
        args ([`PacedConfig`], *optional*):
            Configuration. If `None`, a default one writing to `<model name>-PACED` (built before any model is loaded).
        train_dataset ([`~datasets.Dataset`]):
            Map-style, text-only dataset with a `prompt` column, an `answer` column (for the built-in math reward and
            self-distillation; every column is passed to reward functions) and, for teacher completions from the
            dataset, a `completion` column. A `paced_index` column is added (the row of each problem in the table).
        reward_funcs (`Callable`, `str` or a list of them):
            TRL-style reward functions `f(prompts, completions, completion_ids, **columns) -> list[float | None]`,
            or `"math"` for [`~trl_tip.math_reward`]. A rollout passes with the sum of its rewards, which must lie in
            `[0, 1]`; a rollout no function grades (all `None`) is left out of its problem's pass rate.
        eval_dataset, processing_class, callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.DistillationTrainer`]. Tool calling is not supported.

    Logged: `paced/weight_mean`, `paced/weight_max`, `paced/zero_weight_share` (share of the batch's problems with
    weight 0), `paced/zero_weight_batches` (running count of generation batches whose whole batch weighed 0),
    `paced/skipped_steps` (optimiser steps skipped, learning-rate schedule included, because they weighed 0),
    `paced/pass_rate_mean`, `paced/beta`, `paced/teacher_rollouts`, the training set's pass-rate histogram
    `paced/pass_rate_share_{0,0_25,25_50,50_75,75_100,1}`, `paced/table_weight_mean`, `paced/pass_rate_estimates`,
    `paced/training_rollouts` (running count of training rollouts) and, in online mode, `paced/rollout_reward_mean`.

    With `paced_sampling="sample"`, each generation batch's problems are drawn in proportion to their weight from the
    whole table instead (problems of weight 0 are never rolled out), and the loss is their plain mean.

    Example:

    ```python
    >>> from trl_tip import PacedConfig, PacedTrainer, math_reward
    >>> from trl_tip.tasks import prepare_arithmetic_models

    >>> built = prepare_arithmetic_models()
    >>> trainer = PacedTrainer(
    ...     model=built["student"],
    ...     teacher_model=built["teacher"],
    ...     reward_funcs=math_reward,
    ...     args=PacedConfig("paced-out", max_completion_length=32, bf16=False),
    ...     train_dataset=built["dataset"]["train"],
    ... )
    >>> trainer.train()
    >>> trainer.export_pass_rates("pass_rates.jsonl")
    ```
    """

    _tag_names = ["trl", "trl-tip", "distillation", "paced"]
    _name = "PACED distillation"
    _card_fields = (
        "paced_alpha",
        "paced_beta",
        "pass_rate_rollouts",
        "pass_rate_mode",
        "rollout_source",
        "kl_schedule",
        "schedule_switch_fraction",
        "self_distillation",
        "token_selection",
        "token_ratio",
    )
    _paper = {"title": "PACED: Distillation at the Frontier of Student Competence", "id": "2603.11178"}

    def __init__(
        self,
        model,
        teacher_model=None,
        args: PacedConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        reward_funcs=None,
    ):
        if args is None:
            args = default_config(PacedConfig, model, "PACED")
        if not isinstance(args, PacedConfig):
            raise TypeError(
                f"PacedTrainer needs a PacedConfig as `args`, got {type(args).__name__}. PacedConfig accepts every "
                "DistillationConfig field."
            )
        self.reward_funcs = resolve_reward_funcs(
            reward_funcs,
            trainer="PacedTrainer",
            required=True,
            purpose="to grade the student's rollouts into pass rates",
        )
        train_dataset = self._check_train_dataset(train_dataset, args)
        if args.self_distillation and eval_dataset is not None:
            named = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
            for name, dataset in named:
                columns = getattr(dataset, "column_names", None)
                if columns is not None and self._privileged_column not in columns:
                    raise ValueError(
                        f"`{name}` has no `{self._privileged_column}` column, which the self-distillation teacher "
                        "reads in its prompt during evaluation too."
                    )
        teacher_model = self._resolve_teacher(model, teacher_model, args)

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
        )
        if self.args.self_distillation:
            self.teacher_model.requires_grad_(False)
        if self.is_deepspeed_enabled and self.args.paced_sampling == "weight":
            # DeepSpeed steps its optimiser inside its own engine, where the zero-weight step guard cannot reach.
            logger.warning(
                "Under DeepSpeed a PACED batch whose weights are all zero still takes an optimiser step: its gradient "
                "is zero, but AdamW's momentum and weight decay move the parameters. Use paced_sampling='sample' "
                "(zero-weight problems are never drawn) to avoid such batches, or DDP/FSDP, where the step is skipped."
            )
        self.pass_rate_table = PassRateTable(len(self.train_dataset))
        self.problem_sampler = ProblemSampler(
            self.pass_rate_table, self.args.paced_alpha, self.args.paced_beta, self.args.seed
        )
        self._training_rollouts = 0
        self._zero_weight_batches = 0
        # Σ of the PACED weights of the micro-batches since the last optimiser step (local), whether the coming step
        # is skipped because that sum is zero on every process, and the count of such steps (see `training_step`).
        self._step_weight: torch.Tensor | None = None
        self._skip_optimizer_step = False
        self._skipped_steps = 0
        self._rollout_source = self.args.rollout_source
        self._teacher_writes_completions = False
        self._generation_rows: list[dict] | None = None
        # The micro-batch in flight, for the TRL hooks `_compute_loss` calls without its inputs.
        self._rollout_weights: RolloutWeights | None = None
        self._teacher_sequence: TeacherSequence | None = None
        self.add_callback(PassRateCallback(self))

    # ---- Construction checks ----

    def _check_train_dataset(self, train_dataset, args: PacedConfig) -> Dataset:
        if train_dataset is None:
            raise ValueError("PacedTrainer needs a `train_dataset`: pass rates are estimated on its problems.")
        if isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
            raise ValueError(
                "PacedTrainer needs a map-style `train_dataset` (a datasets.Dataset): every problem's pass rate is "
                "estimated before training. Load the dataset without `streaming=True`."
            )
        check_prompt_column(train_dataset, "train_dataset")
        check_train_rows(train_dataset)
        columns = train_dataset.column_names
        if "image" in columns or "images" in columns:
            raise ValueError("PacedTrainer supports text-only datasets; remove the `image`/`images` column.")
        self._privileged_column, self._privileged_template = None, None
        if args.self_distillation:
            self._privileged_column, self._privileged_template = privileged_context_setup(
                columns, args.privileged_context_column, args.privileged_prompt_template
            )
        # Pass rates grade training problems only; PACED's evaluation scores the divergence, no reward.
        check_reward_columns(self.reward_funcs, train_dataset)
        teacher_track = args.rollout_source == "teacher" or args.kl_schedule == "forward_then_reverse"
        if teacher_track and args.teacher_completions == "dataset" and "completion" not in columns:
            raise ValueError(
                "teacher_completions='dataset' trains on the dataset's `completion` column, which `train_dataset` "
                f"lacks (columns: {columns}). Add it, or set teacher_completions='generate' to sample from the "
                "teacher."
            )
        self._teacher_completion_source = (
            ("dataset" if "completion" in columns else "generate")
            if args.teacher_completions == "auto"
            else args.teacher_completions
        )
        if teacher_track and self._teacher_completion_source == "dataset":
            # Checked now rather than at the first teacher-track step, after the whole pass-rate estimation.
            check_completion_format(train_dataset, "train_dataset")
        if INDEX_COLUMN in columns:
            raise ValueError(
                f"`train_dataset` already has a `{INDEX_COLUMN}` column, which PacedTrainer adds to index the "
                "pass-rate table; rename or remove it."
            )
        return train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))

    @staticmethod
    def _resolve_teacher(model, teacher_model, args: PacedConfig):
        if args.self_distillation:
            if teacher_model is not None:
                raise ValueError(
                    "self_distillation=True makes the teacher a frozen copy of the student; do not pass "
                    "`teacher_model`."
                )
            if isinstance(model, str):
                # A second load of the student's weights: the frozen copy. The student's quantisation does not apply.
                if args.teacher_model_init_kwargs is None:
                    args.teacher_model_init_kwargs = {
                        key: value
                        for key, value in (args.model_init_kwargs or {}).items()
                        if key not in ("quantization_config", "device_map")
                    } or None
                return model
            return copy.deepcopy(model).eval()
        if args.teacher_model_server_url is not None:
            return teacher_model  # served: none is loaded (TipDistillTrainer refuses one passed as well)
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "PacedTrainer needs a teacher: pass `teacher_model` (or set `teacher_model_name_or_path`), or set "
                "self_distillation=True to distil from a frozen copy of the student that sees the answer."
            )
        return teacher_model

    @staticmethod
    def _check_teacher_vocabulary(model, teacher_model, args, processing_class) -> int | None:
        if args is not None and args.self_distillation:
            return None  # the teacher is a copy of the student: its tokenizer and head
        return TipDistillTrainer._check_teacher_vocabulary(model, teacher_model, args, processing_class)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # With `remove_unused_columns=True`, keep what grading, self-distillation and teacher completions read.
        for name in ("answer", "completion", INDEX_COLUMN, self._privileged_column):
            if name is not None and name not in self._signature_columns:
                self._signature_columns.append(name)

    # ---- Generation ----

    def _prepare_inputs(self, generation_batch):
        generates = self._step % self.args.gradient_accumulation_steps == 0 or self._buffered_inputs is None
        if self.model.training and generates and self.args.paced_sampling == "sample":
            # The dataloader's rows only set the batch size: the problems generated for are drawn from the table.
            generation_batch = self._draw_problems(generation_batch)
        return super()._prepare_inputs(generation_batch)

    def _draw_problems(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This process's share of the step's weighted draw, as rows with the columns of the dataloader's `rows`."""
        indices = self.problem_sampler.draw_share(
            self.state.global_step, len(rows), self.accelerator.num_processes, self.accelerator.process_index
        ).tolist()
        drawn = self.train_dataset.select_columns(list(rows[0]))[indices]
        return [{key: drawn[key][i] for key in drawn} for i in range(len(indices))]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        training = self.model.training
        if training:
            self.beta, self._rollout_source = paced_phase(
                self.state.global_step,
                self.state.max_steps,
                self.args.kl_schedule,
                self.args.schedule_switch_fraction,
                self.args.rollout_source,
                self.args.beta,
            )
        self._teacher_writes_completions = training and self._rollout_source == "teacher"
        self._generation_rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._teacher_writes_completions = False
            self._generation_rows = None
        device = output["prompt_ids"].device
        if self.args.self_distillation:
            teacher_prompt_ids = self._privileged_prompt_ids(inputs)
            output.update(
                pad_teacher_prompts(teacher_prompt_ids, self._tokenizer.pad_token_id, self.pad_to_multiple_of, device)
            )
        if training:
            self._add_problem_weights(inputs, output)
        return output

    def _add_problem_weights(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        device = output["prompt_ids"].device
        indices = torch.tensor([row[INDEX_COLUMN] for row in inputs])
        weights = self.pass_rate_table.weights(self.args.paced_alpha, self.args.paced_beta, indices)
        pass_rates = self.pass_rate_table.pass_rates[indices]
        all_weights = self.accelerator.gather(weights.to(device)).cpu()
        all_rates = self.accelerator.gather(pass_rates.to(device)).cpu()
        self._training_rollouts += all_weights.numel()
        # Per-rollout loss weights travel with the batch (split with it over accumulation steps); their sum over the
        # whole generation batch of every process is the loss normaliser, like TRL's `num_items_in_batch`. Problems
        # drawn in proportion to their weight ("sample") take the plain mean: a weight of 1 each.
        loss_weights = torch.ones_like(weights) if self.args.paced_sampling == "sample" else weights
        output["paced_weights"] = loss_weights.to(device)
        weight_sum = float(all_weights.numel()) if self.args.paced_sampling == "sample" else all_weights.sum()
        output["paced_weight_sum"] = torch.as_tensor(weight_sum, dtype=torch.float32).to(device)
        if weight_sum == 0:
            self._zero_weight_batches += 1

        metrics = self._metrics["train"]
        metrics["paced/weight_mean"].append(all_weights.mean().item())
        metrics["paced/weight_max"].append(all_weights.max().item())
        metrics["paced/zero_weight_share"].append((all_weights == 0).float().mean().item())
        metrics["paced/zero_weight_batches"] = [float(self._zero_weight_batches)]
        known = ~torch.isnan(all_rates)
        metrics["paced/pass_rate_mean"].append(all_rates[known].mean().item() if known.any() else math.nan)
        metrics["paced/beta"].append(float(self.beta))
        metrics["paced/teacher_rollouts"].append(float(self._rollout_source == "teacher"))
        for name, share in self.pass_rate_table.histogram().items():
            if name != "unknown" or share:
                metrics[f"paced/pass_rate_share_{name}"].append(share)
        metrics["paced/table_weight_mean"].append(
            self.pass_rate_table.weights(self.args.paced_alpha, self.args.paced_beta).mean().item()
        )
        metrics["paced/pass_rate_estimates"] = [float(self.pass_rate_table.estimates)]
        metrics["paced/training_rollouts"] = [float(self._training_rollouts)]

        if self.args.pass_rate_mode == "online" and self._rollout_source == "student":
            completion_ids = [
                ids[mask.bool()].tolist()
                for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu(), strict=True)
            ]
            rewards = self._grade(inputs, completion_ids)
            all_indices = self.accelerator.gather(indices.to(device)).cpu()
            all_rewards = self.accelerator.gather(rewards.to(device)).cpu()
            # Weights above come from the table before these rollouts: a rollout never sets its own weight.
            self.pass_rate_table.update_online(all_indices, all_rewards, self.args.pass_rate_ema)
            graded = ~torch.isnan(all_rewards)
            mean_reward = all_rewards[graded].mean().item() if graded.any() else math.nan
            metrics["paced/rollout_reward_mean"].append(mean_reward)

    def _privileged_prompt_ids(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        prompts = [
            add_privileged_context(row["prompt"], row[self._privileged_column], self._privileged_template)
            for row in rows
        ]
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        return [torch.tensor(ids) for ids in prompt_ids]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if not self._teacher_writes_completions:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        rows = self._generation_rows
        if self._teacher_completion_source == "dataset":
            return [self._reference_completion_ids(row) for row in rows]
        if self.args.self_distillation:
            prompt_ids = [ids.tolist() for ids in self._privileged_prompt_ids(rows)]
        return self._generate_with_teacher(prompt_ids)

    def _reference_completion_ids(self, row: dict[str, Any]) -> list[int]:
        """The dataset's `completion` as the tokens a model writes after the prompt, up to its first end of turn."""
        completion = row["completion"]
        if is_conversational(row):
            kwargs = {"tokenize": True, **self.chat_template_kwargs}
            prefix = self.processing_class.apply_chat_template(row["prompt"], add_generation_prompt=True, **kwargs)
            full = self.processing_class.apply_chat_template(row["prompt"] + completion, **kwargs)
            prefix = list(prefix["input_ids"] if hasattr(prefix, "keys") else prefix)
            full = list(full["input_ids"] if hasattr(full, "keys") else full)
            if full[: len(prefix)] != prefix:
                raise ValueError(
                    "The chat template renders the prompt differently with and without the reference completion, so "
                    "the completion's tokens cannot be isolated; set teacher_completions='generate'."
                )
            ids = full[len(prefix) :]
            ends = [position for position, token in enumerate(ids) if token in self.eos_token_ids]
            ids = ids[: ends[0] + 1] if ends else ids
        else:
            ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"] + [self._tokenizer.eos_token_id]
        # Like a student rollout, a reference longer than max_completion_length is clipped.
        return ids[: self.max_completion_length] if self.max_completion_length else ids

    @torch.no_grad()
    def _generate_with_teacher(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        if self.served_teacher is not None:
            return self._generate_with_served_teacher(prompt_ids)
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="left")
        attention_mask = attention_mask.to(device)
        with unwrap_model_for_generation(
            self.teacher_model,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            generation_kwargs=self.generation_kwargs,
        ) as teacher:
            generated = teacher.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        return completion_ids_until_eos(generated[:, input_ids.size(1) :], self.eos_token_ids)

    def _generate_with_served_teacher(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        # The server that scores the completions writes them too, with the trainer's sampling settings.
        completions = self.served_teacher.generate(
            [list(ids) for ids in prompt_ids],
            step=self.state.global_step + 1,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k is not None else 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_completion_length,
            generation_kwargs=self.args.generation_kwargs,
        )
        ends = set(self.eos_token_ids)
        cut = []
        for ids in completions:
            stop = next((position for position, token in enumerate(ids) if token in ends), None)
            cut.append(list(ids) if stop is None else list(ids[: stop + 1]))
        return cut

    # ---- Loss ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # transformers' `Trainer` marks the micro-batch after which it steps the optimiser with `sync_gradients`.
        if self.accelerator.sync_gradients:
            self._skip_optimizer_step = self._step_weighs_nothing()
            if self._skip_optimizer_step:
                # Torch's optimisers leave a parameter without a gradient alone: no momentum, no weight decay, no
                # state update. The schedule is held by `_HeldOnSkippedSteps`.
                model.zero_grad(set_to_none=True)
        return loss

    def _step_weighs_nothing(self) -> bool:
        """
        Whether the coming optimiser step's micro-batches all carry zero PACED weight on every process. Such a step
        is skipped, its learning-rate step included: its gradient is zero, but AdamW would still move the parameters
        (its momentum, and decoupled weight decay). DeepSpeed steps inside its engine instead, where the trainer does
        not skip.
        """
        weight, self._step_weight = self._step_weight, None
        if weight is None or self.is_deepspeed_enabled:
            return False
        # Every process runs the micro-batch that ends an accumulation window, so this collective is matched.
        total = self.accelerator.reduce(weight.to(self.accelerator.device), reduction="sum")
        if total.item() != 0:
            return False
        self._skipped_steps += 1
        self._metrics["train"]["paced/skipped_steps"] = [float(self._skipped_steps)]
        return True

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if (
            not self.is_deepspeed_enabled
            and not isinstance(scheduler, (_HeldOnSkippedSteps, *_SCHEDULERS_STEPPED_ON_METRICS))
        ):
            self.lr_scheduler = scheduler = _HeldOnSkippedSteps(scheduler, lambda: self._skip_optimizer_step)
        return scheduler

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.model.training and "paced_weights" in inputs:
            local = inputs["paced_weights"].detach().float().sum()
            self._step_weight = local if self._step_weight is None else self._step_weight + local
            # The per-process share of the global weight sum: DDP averages gradients over processes, as TRL's
            # `num_items_in_batch` is divided by the process count.
            self._rollout_weights = RolloutWeights(
                inputs["paced_weights"], inputs["paced_weight_sum"] / self.accelerator.num_processes
            )
        if "teacher_prompt_ids" in inputs:  # the self-distillation teacher reads its privileged prompt
            self._teacher_sequence = TeacherSequence.of(inputs)
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._rollout_weights = None
            self._teacher_sequence = None

    def _selection_kwargs(self):
        kwargs = super()._selection_kwargs()
        if self._rollout_weights is not None:
            kwargs["rollout_weights"] = self._rollout_weights.weights
            kwargs["weight_sum"] = self._rollout_weights.weight_sum
        return kwargs

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if self._teacher_sequence is not None and unwrapped_model is self.accelerator.unwrap_model(self.teacher_model):
            input_ids, attention_mask = self._teacher_sequence.input_ids, self._teacher_sequence.attention_mask
        return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
