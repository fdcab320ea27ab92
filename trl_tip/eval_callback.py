"""
Sampling evaluation during training: [`PassAtKCallback`] logs [`trl_tip.evaluation`]'s metrics through the trainer,
every process evaluating its share of the problems ([`map_over_processes`], [`padded_shard`]).

Its names are importable from `trl_tip.evaluation` too.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback

from .evaluation import _check_dataset, evaluate_pass_at_k, metrics_for_logging, summarize


def padded_shard(num_items: int, rank: int, world_size: int) -> list[int]:
    """
    Indices of the items process `rank` evaluates: every `world_size`-th from `rank`, then the index 0 repeated until
    every process holds `ceil(num_items / world_size)`. The padding is evaluated and its results dropped (keep the
    first `len(range(rank, num_items, world_size))`): under ZeRO-3 and FSDP2 every `generate` step is a collective,
    so a process with one problem fewer would leave the others waiting in a call it never makes.
    """
    indices = list(range(rank, num_items, world_size))
    per_process = -(-num_items // world_size)
    return indices + [0] * (per_process - len(indices))


def map_over_processes(trainer, dataset, evaluate_shard: Callable) -> list:
    """
    Run `evaluate_shard(model, tokenizer, shard)` on every process with the trainer's prepared (possibly sharded)
    model, each on its [`padded_shard`] of `dataset`, and return the records of all processes, concatenated in process
    order with the padding dropped. `evaluate_shard` returns one record per row of `shard`.

    The model is unwrapped for generation as the trainer does it (`ds3_gather_for_generation=False` generates from
    ZeRO-3's partitions; under FSDP2 each rank generates with its shards), so every process must call this.
    """
    from accelerate.utils import gather_object
    from trl.models.utils import unwrap_model_for_generation

    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = padded_shard(len(dataset), rank, world)
    num_real = len(range(rank, len(dataset), world))
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    gather_weights = getattr(trainer.args, "ds3_gather_for_generation", True)
    records = []
    with unwrap_model_for_generation(
        trainer.model_wrapped, accelerator, gather_deepspeed3_params=gather_weights
    ) as model:
        if indices:
            records = list(evaluate_shard(model, tokenizer, dataset.select(indices)))[:num_real]
    return gather_object(records) if world > 1 else records


class PassAtKCallback(TrainerCallback):
    """
    Sample `num_samples` completions per problem of a dataset during training and log mean@n, pass@1..n and the mean
    completion length through the trainer (`trainer.state.log_history`, and every reporting integration).

    Runs every `eval_steps` optimiser steps and once when training ends (unless the last step was just evaluated).
    With several processes, each one samples its share of the problems and the results are gathered; the shares are
    padded to equal length (see [`padded_shard`]), so every process makes the same `generate` calls, as sharded
    models (ZeRO-3, FSDP2) need.

    Args:
        trainer ([`~transformers.Trainer`]): the trainer to evaluate the model of and to log through (any TRL or
            trl_tip trainer).
        dataset ([`~datasets.Dataset`]): problems with conversational `prompt` and gold `answer` columns.
        num_samples (`int`, *optional*, defaults to `4`): completions per problem (`n`).
        eval_steps (`int`, *optional*): steps between evaluations; defaults to `args.eval_steps` when
            `args.eval_strategy="steps"`, otherwise the evaluation runs only at the end.
        at_end (`bool`, *optional*, defaults to `True`): evaluate when training ends.
        max_new_tokens (`int`, *optional*): completion budget; defaults to `args.max_completion_length` (TRL's
            configs), else 256.
        temperature (`float`, *optional*): defaults to `args.temperature` when the config has one, else 1.0.
        top_p (`float`, *optional*, defaults to `1.0`), top_k (`int`, *optional*, defaults to `0`): as in
            [`evaluate_pass_at_k`].
        batch_size (`int`, *optional*, defaults to `64`): sequences per `generate` call.
        seed (`int`, *optional*, defaults to `0`): sampling seed (plus the process index); the global random state
            of training is left untouched.
        prefix (`str`, *optional*, defaults to `"pass_at_k"`): logged names are `{prefix}/mean_accuracy`,
            `{prefix}/pass@{k}` and `{prefix}/mean_completion_tokens`.

    Example:

    ```python
    trainer = GRPOTrainer(...)
    trainer.add_callback(PassAtKCallback(trainer, dataset["test"], num_samples=8, eval_steps=50))
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer,
        dataset,
        num_samples: int = 4,
        eval_steps: int | None = None,
        at_end: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 64,
        seed: int = 0,
        prefix: str = "pass_at_k",
    ):
        _check_dataset(dataset, num_samples)
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}.")
        self.trainer = trainer
        self.dataset = dataset
        self.num_samples = num_samples
        args = trainer.args
        if eval_steps is None and str(getattr(args, "eval_strategy", "no")).endswith("steps"):
            eval_steps = int(args.eval_steps) if args.eval_steps and args.eval_steps >= 1 else None
        self.eval_steps = eval_steps
        self.at_end = at_end
        self.max_new_tokens = max_new_tokens or getattr(args, "max_completion_length", None) or 256
        self.temperature = temperature if temperature is not None else getattr(args, "temperature", 1.0)
        self.top_p, self.top_k, self.batch_size, self.seed, self.prefix = top_p, top_k, batch_size, seed, prefix
        self.history: list[tuple[int, dict]] = []  # (step, summary) of every evaluation, on every process
        self._last_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            # Logging resets `control.should_log`; the trainer's own log of this step must still happen.
            should_log = control.should_log
            self.evaluate(state.global_step)
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.at_end and self._last_step != state.global_step:
            self.evaluate(state.global_step)

    def evaluate(self, step: int) -> dict:
        """Evaluate now and log the metrics at `step`; returns the summary."""
        trainer = self.trainer
        rank = trainer.accelerator.process_index

        def evaluate_shard(model, tokenizer, shard):
            _, problems = evaluate_pass_at_k(
                model,
                tokenizer,
                shard,
                num_samples=self.num_samples,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                batch_size=self.batch_size,
                seed=self.seed + rank,
                chat_template_kwargs=getattr(trainer.args, "chat_template_kwargs", None),
                return_problems=True,
            )
            return [{key: problem[key] for key in ("scores", "completion_tokens", "pass_at_k", "gradable")}
                    for problem in problems]

        problems = map_over_processes(trainer, self.dataset, evaluate_shard)
        summary = summarize(problems, self.num_samples)
        # `transformers.Trainer.log`, not the TRL trainers' override, which would fold (and reset) the training
        # metrics accumulated since the last logging step into this entry.
        from transformers import Trainer

        Trainer.log(trainer, metrics_for_logging(summary, self.prefix))
        self.history.append((step, summary))
        self._last_step = step
        return summary
