"""PACED's pass-rate machinery: the table of the student's pass rate on each training problem, its estimation from
graded rollouts, its online update, its file format, the sampler that draws problems in proportion to their weight
(`paced_sampling="sample"`).

[`~trl_tip.PacedTrainer`] wires these into TRL's training loop (`trl_tip.trainers.paced`: the pass-rate glue and the
callback that schedules estimations); nothing here depends on the trainer class.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable

import torch
from accelerate.logging import get_logger
from datasets import Dataset
from tqdm.auto import tqdm

from .resume import atomic_path
from .weighting import paced_weight


logger = get_logger(__name__)

PASS_RATE_FILE = "paced_pass_rates.json"
PASS_RATE_FORMAT = "trl_tip.paced.pass_rates/1"
INDEX_COLUMN = "paced_index"
# Pass-rate histogram bins logged as `paced/pass_rate_share_<name>`: exact 0 and 1, and four bins between.
_HISTOGRAM_BINS = ("0", "0_25", "25_50", "50_75", "75_100", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------


def pass_rates_from_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Pass rate of each problem from the rewards of its rollouts.

    Args:
        rewards (`torch.Tensor`): `(N, K)` reward in `[0, 1]` of each of the K rollouts of N problems; `NaN` for a
            rollout that could not be graded.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(N,)` float32 pass rates (the mean over graded rollouts; `NaN` when none
        was graded) and `(N,)` the number of graded rollouts.
    """
    graded = ~torch.isnan(rewards)
    counts = graded.sum(dim=-1)
    totals = torch.where(graded, rewards, torch.zeros_like(rewards)).sum(dim=-1)
    rates = torch.where(counts > 0, totals / counts.clamp(min=1), torch.full_like(totals, math.nan))
    return rates.float(), counts


def ema_update(
    pass_rates: torch.Tensor, indices: torch.Tensor, rewards: torch.Tensor, rate: float
) -> torch.Tensor:
    """
    Online pass-rate update: `p_i ← (1 − rate) p_i + rate · r̄_i` for each problem `i` in `indices`, `r̄_i` being the
    mean reward of its rollouts here (a problem drawn several times is updated once). Ungraded rollouts (`NaN`) are
    ignored; an unknown pass rate (`NaN`) is replaced by `r̄_i`.

    Returns:
        `torch.Tensor`: the updated copy of `pass_rates`.
    """
    updated = pass_rates.clone()
    graded = ~torch.isnan(rewards)
    indices, rewards = indices[graded].long(), rewards[graded].float()
    if indices.numel() == 0:
        return updated
    unique, inverse = torch.unique(indices, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, rewards)
    counts = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, torch.ones_like(rewards))
    observed = sums / counts
    previous = updated[unique]
    updated[unique] = torch.where(torch.isnan(previous), observed, (1 - rate) * previous + rate * observed)
    return updated



def _prompts_digest(dataset: Dataset) -> str:
    # Identifies the training problems a pass-rate table belongs to, independently of how the dataset was built.
    digest = hashlib.sha256()
    for prompt in dataset["prompt"]:
        digest.update(json.dumps(prompt, sort_keys=True, default=str).encode())
    return digest.hexdigest()



# ---------------------------------------------------------------------------------------------------------------------
# Pass-rate table
# ---------------------------------------------------------------------------------------------------------------------


class PassRateTable:
    """
    The student's pass rate on each training problem, indexed by the problem's row in the training set.

    Attributes:
        pass_rates (`torch.Tensor`): `(N,)` float32; `NaN` where unknown (not estimated yet, or no rollout graded).
        num_graded (`torch.Tensor`): `(N,)` graded rollouts behind the last estimate of each problem.
        estimates (`int`): full estimations done so far (1 after the initial one; more with refreshes).
        estimated_at_step (`int` or `None`): optimiser step of the last full estimation.
        online_updates (`int`): online moving-average updates applied since.
    """

    def __init__(self, num_problems: int):
        self.pass_rates = torch.full((num_problems,), math.nan, dtype=torch.float32)
        self.num_graded = torch.zeros(num_problems, dtype=torch.long)
        self.estimates = 0
        self.estimated_at_step: int | None = None
        self.online_updates = 0

    def __len__(self) -> int:
        return self.pass_rates.numel()

    @property
    def is_estimated(self) -> bool:
        return self.estimates > 0

    def weights(self, alpha: float, beta: float, indices: torch.Tensor | None = None) -> torch.Tensor:
        """PACED weights of the problems at `indices` (all when `None`); `0` where the pass rate is unknown."""
        rates = self.pass_rates if indices is None else self.pass_rates[indices.long().cpu()]
        known = ~torch.isnan(rates)
        return torch.where(known, paced_weight(rates.nan_to_num(0.0), alpha, beta), torch.zeros_like(rates))

    def histogram(self) -> dict[str, float]:
        """Shares of problems with p = 0, p in (0, .25], (.25, .5], (.5, .75], (.75, 1), p = 1, and unknown p."""
        rates = self.pass_rates
        total = max(len(self), 1)
        known = ~torch.isnan(rates)
        masks = (
            rates == 0,
            (rates > 0) & (rates <= 0.25),
            (rates > 0.25) & (rates <= 0.5),
            (rates > 0.5) & (rates <= 0.75),
            (rates > 0.75) & (rates < 1),
            rates == 1,
        )
        shares = {name: (mask & known).sum().item() / total for name, mask in zip(_HISTOGRAM_BINS, masks, strict=True)}
        shares["unknown"] = (~known).sum().item() / total
        return shares

    def summary(self, alpha: float = 1.0, beta: float = 1.0) -> str:
        """A few lines for humans: the pass-rate histogram and the weight distribution."""
        shares = self.histogram()
        labels = ("p=0", "0<p<=.25", ".25<p<=.5", ".5<p<=.75", ".75<p<1", "p=1")
        weights = self.weights(alpha, beta)
        known = ~torch.isnan(self.pass_rates)
        lines = [
            f"pass rates of {len(self)} problems (mean {self.pass_rates[known].mean().item():.3f}):"
            if known.any()
            else f"pass rates of {len(self)} problems: none known",
            "  "
            + "  ".join(f"{label}: {shares[name]:.1%}" for label, name in zip(labels, _HISTOGRAM_BINS, strict=True)),
        ]
        if shares["unknown"]:
            lines[-1] += f"  unknown: {shares['unknown']:.1%}"
        positive = weights[weights > 0]
        lines.append(
            f"weights p^{alpha:g}(1-p)^{beta:g}: mean {weights.mean().item():.4f}, "
            f"zero for {(weights == 0).float().mean().item():.1%}"
            + (
                f"; non-zero ones from {positive.min().item():.4f} to {positive.max().item():.4f}"
                f" (median {positive.median().item():.4f})"
                if positive.numel()
                else ""
            )
        )
        return "\n".join(lines)

    def set_estimate(self, indices: torch.Tensor, pass_rates: torch.Tensor, num_graded: torch.Tensor) -> None:
        self.pass_rates[indices.long()] = pass_rates.float()
        self.num_graded[indices.long()] = num_graded.long()

    def update_online(self, indices: torch.Tensor, rewards: torch.Tensor, rate: float) -> None:
        self.pass_rates = ema_update(self.pass_rates, indices.cpu(), rewards.cpu(), rate)
        self.online_updates += 1

    def state_dict(self) -> dict:
        return {
            "num_problems": len(self),
            "pass_rates": [None if math.isnan(p) else p for p in self.pass_rates.tolist()],
            "num_graded": self.num_graded.tolist(),
            "estimates": self.estimates,
            "estimated_at_step": self.estimated_at_step,
            "online_updates": self.online_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_problems"] != len(self):
            raise ValueError(
                f"The saved pass-rate table covers {state['num_problems']} problems but the training set has "
                f"{len(self)}; resume with the training set the table was estimated on."
            )
        rates = [math.nan if p is None else p for p in state["pass_rates"]]
        self.pass_rates = torch.tensor(rates, dtype=torch.float32)
        self.num_graded = torch.tensor(state["num_graded"], dtype=torch.long)
        self.estimates = state["estimates"]
        self.estimated_at_step = state["estimated_at_step"]
        self.online_updates = state["online_updates"]

    def to_dataset(self, dataset: Dataset | None = None, alpha: float = 1.0, beta: float = 1.0) -> Dataset:
        """
        The table as a [`~datasets.Dataset`]: `index`, `pass_rate` (`None` if unknown), `num_graded_rollouts`,
        `weight`, and, when the training `dataset` is given, its columns (`prompt`, `answer`, ...) alongside.
        """
        columns = {}
        if dataset is not None:
            if len(dataset) != len(self):
                raise ValueError(
                    f"The table covers {len(self)} problems but `dataset` has {len(dataset)} rows; pass the training "
                    "set the table was estimated on (same rows, same order), or no dataset for the table alone."
                )
            columns = {name: dataset[name] for name in dataset.column_names if name != INDEX_COLUMN}
        columns.update(
            {
                "index": list(range(len(self))),
                "pass_rate": [None if math.isnan(p) else p for p in self.pass_rates.tolist()],
                "num_graded_rollouts": self.num_graded.tolist(),
                "weight": self.weights(alpha, beta).tolist(),
            }
        )
        return Dataset.from_dict(columns)


# ---------------------------------------------------------------------------------------------------------------------
# Estimation and persistence
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_pass_rates(
    table: PassRateTable,
    dataset: Dataset,
    *,
    tokenize_prompts: Callable[[list], list[list[int]]],
    sample_completions: Callable[[list[list[int]], int], list[list[int]]],
    grade: Callable[[list[dict], list[list[int]]], torch.Tensor],
    accelerator,
    rollouts: int,
    per_process: int,
    step: int,
    alpha: float,
    beta: float,
    disable_progress: bool = False,
) -> PassRateTable:
    """
    Estimate every problem of `dataset` into `table`: `rollouts` sampled completions per problem, graded.

    Work is split over processes in batches of `per_process` problems; every process ends with the whole table.

    Args:
        table ([`PassRateTable`]): updated in place (and returned).
        dataset ([`~datasets.Dataset`]): the training set, one problem per row, in table order.
        tokenize_prompts (`Callable`): prompts -> their token ids.
        sample_completions (`Callable`): `(prompt_ids, n)` -> `n` sampled completions of each prompt, prompt-major.
        grade (`Callable`): `(rows, completion_ids)` -> `(n,)` rewards in [0, 1], `NaN` for an ungraded one.
        accelerator ([`~accelerate.Accelerator`]): gathers the processes' shares.
        rollouts (`int`): K, completions per problem.
        per_process (`int`): problems per process per generation call.
        step (`int`): the optimiser step the estimate belongs to.
        alpha, beta (`float`): PACED's exponents, for the summary logged.
        disable_progress (`bool`): hide the progress bar.
    """
    num_problems = len(dataset)
    num_processes, rank = accelerator.num_processes, accelerator.process_index
    per_call = per_process * num_processes
    device = accelerator.device
    progress = tqdm(
        total=num_problems,
        desc=f"Estimating pass rates ({rollouts} rollouts per problem)",
        disable=not accelerator.is_local_main_process or disable_progress,
    )
    for start in range(0, num_problems, per_call):
        # Every process takes a slice of the same size (padded with problem 0, discarded below), so that the
        # collective generation backends (vLLM server, DeepSpeed ZeRO-3) see the same calls on every process.
        indices = [start + rank * per_process + offset for offset in range(per_process)]
        valid = [index < num_problems for index in indices]
        indices = [index if ok else 0 for index, ok in zip(indices, valid, strict=True)]
        batch = dataset[indices]
        rows = [{key: batch[key][i] for key in batch} for i in range(len(indices))]
        prompt_ids = tokenize_prompts([row["prompt"] for row in rows])
        completion_ids = sample_completions(prompt_ids, rollouts)
        repeated_rows = [row for row in rows for _ in range(rollouts)]
        rewards = grade(repeated_rows, completion_ids).view(len(rows), rollouts)
        pass_rates, num_graded = pass_rates_from_rewards(rewards)
        local = torch.tensor([index if ok else -1 for index, ok in zip(indices, valid, strict=True)])
        all_indices = accelerator.gather(local.to(device)).cpu()
        all_rates = accelerator.gather(pass_rates.to(device)).cpu()
        all_graded = accelerator.gather(num_graded.to(device)).cpu()
        keep = all_indices >= 0
        table.set_estimate(all_indices[keep], all_rates[keep], all_graded[keep])
        progress.update(int(keep.sum().item()))
    progress.close()
    table.estimates += 1
    table.estimated_at_step = step
    table.online_updates = 0
    num_unknown = int(torch.isnan(table.pass_rates).sum().item())
    if num_unknown:
        logger.warning(
            f"{num_unknown} of the {num_problems} training problems ({num_unknown / num_problems:.1%}) have no "
            "graded rollout (every reward function returned None, e.g. for a gold answer that is not a mathematical "
            "object such as 'n/a' or 'see solution'), so their pass rate is unknown and their weight is 0. Check the "
            "`answer` column."
        )
    logger.info(f"Pass rates estimated at step {step}:\n" + table.summary(alpha, beta), main_process_only=True)
    return table


def save_pass_rate_table(table: PassRateTable, path: str, dataset: Dataset, rollouts: int) -> None:
    """Write `table` (what a resumed run restores) to `path` as JSON, tied to the prompts of `dataset`."""
    state = {
        "format": PASS_RATE_FORMAT,
        "prompts_sha256": _prompts_digest(dataset),
        "pass_rate_rollouts": rollouts,
        **table.state_dict(),
    }
    # Renamed into place once written: a save cut off midway never leaves a truncated table in a checkpoint.
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        json.dump(state, file)


def load_pass_rate_table(table: PassRateTable, path: str, dataset: Dataset) -> None:
    """Restore into `table` a file written by [`save_pass_rate_table`] for the same training prompts."""
    with open(path) as file:
        state = json.load(file)
    if state.get("prompts_sha256") != _prompts_digest(dataset):
        raise ValueError(
            f"The pass-rate table in {path} was estimated on other training prompts than `train_dataset`; resume "
            "with the same training set (same rows, same order)."
        )
    table.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Weighted sampling of training problems
# ---------------------------------------------------------------------------------------------------------------------


def sampling_probabilities(weights: torch.Tensor) -> torch.Tensor:
    """
    Probability of drawing each problem under `paced_sampling="sample"`: `w_i / Σ_j w_j`, float64.

    Drawing problems i.i.d. from these probabilities and averaging their losses `ℓ_i` has expectation
    `Σ_i w_i ℓ_i / Σ_i w_i`: the weighted objective of `paced_sampling="weight"` over the whole training set, without
    spending rollouts on problems of weight 0.

    Raises:
        `ValueError`: when every weight is 0 (nothing can be drawn).
    """
    weights = weights.double()
    total = weights.sum()
    if not total > 0:
        raise ValueError(
            f"paced_sampling='sample' draws problems with probability proportional to their weight, but all "
            f"{weights.numel()} training problems weigh 0 (every pass rate is 0, 1 or unknown under the current "
            "paced_alpha / paced_beta), so there is nothing to draw. Use problems the student sometimes solves, "
            "paced_sampling='weight', or paced_alpha = paced_beta = 0."
        )
    return weights / total


class ProblemSampler:
    """
    Draws the training problems of each generation batch with probability proportional to their PACED weight.

    Draws are i.i.d. with replacement (what keeps the plain mean an unbiased estimate of the weighted objective; a
    problem may appear more than once in a batch) from the table as it is when the batch is generated, so the sampler
    follows the table through refreshes and online updates. Problems whose pass rate is unknown weigh 0 and are never
    drawn. The draw of optimiser step `s` depends only on `seed`, `s` and the table: every process computes the same
    global draw and takes its own disjoint slice of it, and a run resumed at step `s` draws what the uninterrupted run
    would have drawn from the same table.

    Args:
        table ([`PassRateTable`]): read at every draw.
        alpha, beta (`float`): PACED's exponents.
        seed (`int`): base seed of the draws.
    """

    def __init__(self, table: PassRateTable, alpha: float, beta: float, seed: int):
        self.table, self.alpha, self.beta, self.seed = table, alpha, beta, seed

    def generator(self, step: int) -> torch.Generator:
        # A seed derived from (seed, step) rather than one running generator: the state to restore is the step.
        key = hashlib.sha256(f"trl_tip.paced.sample:{self.seed}:{step}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))

    def draw(self, step: int, num_draws: int) -> torch.Tensor:
        """`(num_draws,)` problem indices (int64) of the global generation batch of optimiser step `step`."""
        probabilities = sampling_probabilities(self.table.weights(self.alpha, self.beta))
        return torch.multinomial(probabilities, num_draws, replacement=True, generator=self.generator(step))

    def draw_share(self, step: int, per_process: int, num_processes: int, rank: int) -> torch.Tensor:
        """This process's `per_process` indices: slice `rank` of the global draw of `per_process × num_processes`."""
        drawn = self.draw(step, per_process * num_processes)
        return drawn[rank * per_process : (rank + 1) * per_process]
