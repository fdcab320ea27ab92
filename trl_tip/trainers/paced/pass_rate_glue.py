"""
PACED's pass-rate glue: the trainer methods that estimate, grade, save, restore and export the pass-rate table of
`trl_tip.pass_rates`.
"""

from __future__ import annotations

import json
import math
import os

import torch
from accelerate.logging import get_logger
from datasets import Dataset

from ...pass_rates import (
    PASS_RATE_FILE,
    PassRateTable,
    estimate_pass_rates,
    load_pass_rate_table,
    save_pass_rate_table,
)
from .._inputs import reward_function_name
from .._rewards import reward_table


logger = get_logger(__name__)


class PassRateMixin:
    """
    The pass-rate table of a [`PacedTrainer`]: estimated with the student's own rollouts, graded by its reward
    functions, saved with every checkpoint and restored on resume. Mixed into the trainer before TRL's
    `DistillationTrainer`; reads `self.pass_rate_table` and `self.reward_funcs`.
    """

    def estimate_pass_rates(self) -> PassRateTable:
        """
        Estimate every training problem's pass rate with the current student: `pass_rate_rollouts` sampled rollouts
        per problem (vLLM when `use_vllm=True`), graded by the reward functions. Work is split over processes in
        batches of `pass_rate_batch_size` problems; every process ends with the whole table. Called when training
        starts (unless a checkpoint's table was restored) and, with `pass_rate_mode="refresh"`, on schedule.
        """
        table = estimate_pass_rates(
            self.pass_rate_table,
            self.train_dataset,
            tokenize_prompts=lambda prompts: self._tokenize_prompts(prompts)[0],
            sample_completions=self._sample_student_completions,
            grade=self._grade,
            accelerator=self.accelerator,
            rollouts=self.args.pass_rate_rollouts,
            per_process=self.args.pass_rate_batch_size
            or self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
            step=self.state.global_step,
            alpha=self.args.paced_alpha,
            beta=self.args.paced_beta,
            disable_progress=self.args.disable_tqdm,
        )
        # Logged with the next training metrics: problems no reward function could grade (e.g. an `answer` that is
        # not a mathematical object, such as "n/a"), which train with weight 0.
        num_unknown = int(torch.isnan(table.pass_rates).sum().item())
        self._metrics["train"]["paced/ungradable_problems"].append(float(num_unknown))
        return table

    def _sample_student_completions(self, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
        if self.use_vllm:
            if self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step
            _, completion_ids, _, _ = self.vllm_generation.generate(
                prompts=repeated, images=None, num_generations=num_generations
            )
            return completion_ids
        # TRL's own sampling path (bypassing this class's teacher-completion switch).
        return super()._generate_single_turn(repeated, None, {})

    def _grade(self, rows: list[dict], completion_ids: list[list[int]]) -> torch.Tensor:
        """Sum of the rewards of each completion: `(n,)` float32 in [0, 1], `NaN` where no function graded it."""
        table = reward_table(self, self.reward_funcs, rows, completion_ids)
        graded = ~torch.isnan(table).all(dim=1)
        total = table.nan_to_num(0.0).sum(dim=1)
        if ((total < 0) | (total > 1)).any():
            bad = total[(total < 0) | (total > 1)][0].item()
            raise ValueError(
                f"The rewards of a rollout summed to {bad}; PACED reads the summed reward of a rollout as its pass "
                f"score, which must lie in [0, 1]. Reward functions: "
                f"{', '.join(map(reward_function_name, self.reward_funcs))}."
            )
        return torch.where(graded, total, torch.full_like(total, math.nan))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Checkpoints save the model through here too, so the table lands in every checkpoint and in the final output.
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.pass_rate_table.is_estimated:
            os.makedirs(output_dir, exist_ok=True)
            self.save_pass_rates(os.path.join(output_dir, PASS_RATE_FILE))

    def save_pass_rates(self, path: str) -> None:
        """Write the pass-rate table (what a resumed run restores) to `path` as JSON."""
        save_pass_rate_table(self.pass_rate_table, path, self.train_dataset, self.args.pass_rate_rollouts)

    def load_pass_rates(self, path: str) -> None:
        """Restore a table written by [`~PacedTrainer.save_pass_rates`]; training then skips the initial estimation."""
        load_pass_rate_table(self.pass_rate_table, path, self.train_dataset)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every resume path (DeepSpeed included) comes through here, before `on_train_begin` decides to estimate.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, PASS_RATE_FILE)
        if os.path.exists(path):
            self.load_pass_rates(path)
        else:
            logger.warning(f"{checkpoint} has no {PASS_RATE_FILE}; pass rates are estimated again.")

    def _checkpoint_files(self) -> list[str]:
        # Written by `save_model`, before transformers' trainer state.
        return [*super()._checkpoint_files(), PASS_RATE_FILE]

    def export_pass_rates(self, path: str | None = None) -> Dataset:
        """
        The pass-rate table joined with the training set (prompt, answer, ..., `pass_rate`, `num_graded_rollouts`,
        `weight`), as a [`~datasets.Dataset`]; also written to `path` when given (`.json`: one JSON list, `.jsonl`: one
        record per line).
        """
        exported = self.pass_rate_table.to_dataset(self.train_dataset, self.args.paced_alpha, self.args.paced_beta)
        if path is not None:
            if path.endswith(".jsonl"):
                exported.to_json(path, lines=True)
            elif path.endswith(".json"):
                with open(path, "w") as file:
                    json.dump(exported.to_list(), file, default=str)
            else:
                raise ValueError(f"export_pass_rates writes `.json` or `.jsonl` files, got {path!r}.")
        return exported
