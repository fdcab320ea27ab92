"""ACE-GRPO: GRPO with an asymmetric, confidence-aware penalty on wrong rollouts."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from .._trl_compat import platform_vllm_generation
from ..hub import TrlTipHubMixin
from ..resume import ResumableTrainerMixin
from ..weighting import (
    ACE_CONFIDENCE_REDUCTIONS,
    ACE_TRANSFORMS,
    ace_confidence_shift,
    ace_scale_advantages,
    ace_scale_factors,
)
from ._inputs import (
    check_prompts,
    check_reward_columns,
    check_sampling,
    model_written_mask,
    pin_memory_where_it_helps,
)


# Any non-zero value: while `GRPOTrainer.__init__` runs with it, TRL builds and prepares the reference model exactly
# as it does for a KL penalty. The configured `beta` is restored before training starts.
_BETA_THAT_BUILDS_THE_REFERENCE = 1.0
# Keys ACE adds to a generation batch (each `(B, ...)`, so TRL's shuffling and splitting carry them with their rows):
# the reference log-probabilities when TRL computes none (beta = 0), and the mark of a batch whose advantages are
# scaled in the loss, from the log-probabilities the loss computes anyway.
REFERENCE_LOGPS_KEY = "ace_ref_per_token_logps"
DEFERRED_SCALING_KEY = "ace_scale_in_loss"
# The confidence shift measured in the loss's pass, kept in the micro-batch until the loss has been computed.
CONFIDENCE_SHIFT_KEY = "ace_confidence_shift"


@dataclass
class ACEGRPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`ACEGRPOTrainer`].

    Extends [`~trl.GRPOConfig`] with the parameters of ACE, an asymmetric confidence-aware error penalty: the advantage
    `A_i < 0` of a wrong rollout is multiplied by `1 + α · g(c_i)`, where `c_i` is the rollout's confidence shift, the
    sequence-level log-ratio `log π_old(y_i|x) − log π_ref(y_i|x)`, i.e. the sum over its completion tokens of
    `log π_old(y_t) − log π_ref(y_t)`. Rollouts with `A_i >= 0` are left alone. With `ace_alpha=0.0` training is
    exactly that of [`~trl.GRPOTrainer`].

    Parameters:
        ace_alpha (`float`, *optional*, defaults to `1.0`):
            Strength `α >= 0` of the penalty. `0.0` reproduces GRPO exactly.
        ace_transform (`str`, *optional*, defaults to `"softplus"`):
            Function `g` applied to the confidence shift: `"softplus"` (smooth; every wrong rollout is scaled by at
            least `1 + α · ln 2`) or `"relu"` (only wrong rollouts the policy became more confident in are scaled).
        ace_confidence (`str`, *optional*, defaults to `"sum"`):
            How the per-token log-ratios of a rollout are combined into its confidence shift: `"sum"` (the paper's
            sequence-level log-ratio) or `"mean"`. A per-token mean stays near 0, where softplus makes the factor a
            near-constant `1 + α · ln 2` on every wrong rollout: a flat up-weighting of negatives, not ACE.
        ace_max_factor (`float` or `None`, *optional*, defaults to `None`):
            Upper bound `>= 1` on the factor `1 + α · g(c_i)`. `None` (the paper's setting) leaves it unbounded: with
            `"sum"` the factor is ≈ `1 + α · c_i` for large shifts and can reach tens on long rollouts.

    The reference model `π_ref` is needed even when `beta=0.0`: with a PEFT model it is the model with the adapter
    disabled (or TRL's frozen `"ref"` copy of a pretrained adapter), otherwise a frozen copy of the initial model is
    loaded once, as TRL does for `beta != 0`.
    """

    ace_alpha: float = field(
        default=1.0,
        metadata={
            "help": "Strength α >= 0 of ACE's penalty: the advantage A < 0 of a wrong rollout becomes "
            "A·(1 + α·g(c)), c being the rollout's confidence shift. 0.0 reproduces GRPO exactly."
        },
    )
    ace_transform: str = field(
        default="softplus",
        metadata={
            "help": "Function g applied to the confidence shift: 'softplus' (every wrong rollout is scaled by at "
            "least 1 + α·ln 2) or 'relu' (only wrong rollouts the policy became more confident in are scaled).",
            "choices": list(ACE_TRANSFORMS),
        },
    )
    ace_confidence: str = field(
        default="sum",
        metadata={
            "help": "How a rollout's per-token log-ratios log π_old − log π_ref are combined into its confidence "
            "shift: 'sum' (the sequence-level log-ratio log π_old(y|x) − log π_ref(y|x), as the paper defines it) or "
            "'mean' (near 0 for every rollout, so softplus gives a flat factor ≈ 1 + α·ln 2).",
            "choices": list(ACE_CONFIDENCE_REDUCTIONS),
        },
    )
    ace_max_factor: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound >= 1 on the factor 1 + α·g(c) of a wrong rollout. None (the paper's setting) leaves "
            "it unbounded; for large c the factor is ≈ 1 + α·c."
        },
    )

    def __post_init__(self):
        if not isinstance(self.ace_alpha, (int, float)) or not self.ace_alpha >= 0:
            raise ValueError(f"ace_alpha must be a number >= 0 (0.0 is plain GRPO), got {self.ace_alpha!r}.")
        if self.ace_transform not in ACE_TRANSFORMS:
            raise ValueError(f"ace_transform must be one of {list(ACE_TRANSFORMS)}, got {self.ace_transform!r}.")
        if self.ace_confidence not in ACE_CONFIDENCE_REDUCTIONS:
            raise ValueError(
                f"ace_confidence must be one of {list(ACE_CONFIDENCE_REDUCTIONS)}, got {self.ace_confidence!r}."
            )
        if self.ace_max_factor is not None:
            if not isinstance(self.ace_max_factor, (int, float)) or not self.ace_max_factor >= 1:
                raise ValueError(
                    f"ace_max_factor must be None (no bound) or a number >= 1, got {self.ace_max_factor!r}."
                )
            self.ace_max_factor = float(self.ace_max_factor)
        self.ace_alpha = float(self.ace_alpha)
        super().__post_init__()
        check_sampling(
            self.temperature,
            self.generation_kwargs,
            greedy_error="every rollout of a group would be the same completion, so every group-normalised "
            "advantage is zero and nothing is learned. Remove do_sample from generation_kwargs.",
        )
        pin_memory_where_it_helps(self)


@contextmanager
def _rng_untouched(device: torch.device):
    # The extra forward passes must not advance any random stream (dropout, if enabled), so that sampling and
    # shuffling afterwards are those of plain GRPO.
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
    else:
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            yield


class ACEGRPOTrainer(ResumableTrainerMixin, TrlTipHubMixin, GRPOTrainer):
    """
    Trainer for ACE-GRPO: Group Relative Policy Optimization with an asymmetric confidence-aware error penalty.

    After TRL computes the group-normalised advantages, each rollout's confidence shift `c_i` (sum over its
    completion tokens of `log π_old − log π_ref`, detached) is measured and the advantage of every wrong rollout
    (`A_i < 0`) is scaled by `1 + α · g(c_i)` (see [`~trl_tip.ace_scale_advantages`]). Everything else is TRL's GRPO:
    every `loss_type`, vLLM generation, PEFT/QLoRA, multi-GPU.

    The constructor is that of [`~trl.GRPOTrainer`]; `args` must be an [`ACEGRPOConfig`]. Unlike `GRPOTrainer`, a
    reference model is used even when `beta=0.0`: with PEFT the adapter is disabled to score it, otherwise a frozen
    copy of the initial model is loaded from the policy's path (the model must therefore be given as a path or have
    been loaded with `from_pretrained`). π_old costs no pass of its own: ACE reads TRL's sampling-time log-probabilities
    where TRL computes them, and otherwise scales each micro-batch's advantages in the loss, from the log-probabilities
    TRL's loss computes anyway (which it takes, detached, as π_old).

    Logged metrics (besides GRPO's): the distribution of `c_i` over the batch the advantages are scaled on (the
    generation batch, or the micro-batch when they are scaled in the loss) of all processes
    (`ace/confidence_shift_mean`, `_min`, `_p10`, `_p50`, `_p90`, `_max`), that of the factor over the wrong rollouts
    (`ace/scale_factor_mean`, `_p50`, `_p90`, `_max`) and `ace/scaled_fraction` (share of rollouts whose advantage was
    changed).

    Example:

    ```python
    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer, math_reward

    trainer = ACEGRPOTrainer(
        model="Qwen/Qwen2.5-Math-1.5B",
        reward_funcs=math_reward,
        args=ACEGRPOConfig(output_dir="ace-grpo", ace_alpha=1.0),
        train_dataset=dataset,  # with `prompt` and `answer` columns
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-tip", "grpo", "ace-grpo"]
    _name = "ACE-GRPO"
    _paper = {
        "title": "Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for Reinforcement "
        "Learning",
        "id": "2602.21420",
    }
    _card_fields = ("ace_alpha", "ace_transform", "ace_confidence", "ace_max_factor", "loss_type", "num_generations")

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: ACEGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = ACEGRPOConfig(f"{model_name.split('/')[-1]}-ACE-GRPO")
        elif not isinstance(args, ACEGRPOConfig):
            raise TypeError(
                f"ACEGRPOTrainer needs an ACEGRPOConfig, got {type(args).__name__}; build one with the same fields "
                "plus ace_alpha / ace_transform / ace_confidence."
            )
        check_prompts(train_dataset, eval_dataset)
        check_reward_columns(reward_funcs, train_dataset, eval_dataset)
        if (
            args.beta == 0.0
            and peft_config is None
            and not isinstance(model, str)
            and not is_peft_model(model)
            and not get_config_model_id(model.config)
        ):
            raise ValueError(
                "ACEGRPOTrainer loads a frozen reference copy of the policy from its path, but the model instance you "
                "passed has none (`model.config._name_or_path` is empty). Save it with `save_pretrained` and pass "
                "the directory (or load it with `from_pretrained`), or train a PEFT adapter."
            )

        # TRL creates the reference model only when beta != 0. ACE needs it for the confidence shift whatever the KL
        # coefficient is, so the trainer is built as if beta were non-zero, which makes TRL load the reference (or,
        # for a pretrained PEFT adapter, its frozen "ref" copy) and prepare it for DeepSpeed/FSDP/fp32 heads exactly
        # as for a KL penalty. TRL reseeds after doing so, so this consumes no randomness of the run.
        beta = args.beta
        if beta == 0.0:
            args.beta = _BETA_THAT_BUILDS_THE_REFERENCE
        try:
            with platform_vllm_generation(args):
                super().__init__(
                    model=model,
                    reward_funcs=reward_funcs,
                    args=args,
                    train_dataset=train_dataset,
                    eval_dataset=eval_dataset,
                    processing_class=processing_class,
                    reward_processing_classes=reward_processing_classes,
                    callbacks=callbacks,
                    optimizers=optimizers,
                    quantization_config=quantization_config,
                    peft_config=peft_config,
                    tools=tools,
                    rollout_func=rollout_func,
                    environment_factory=environment_factory,
                )
        finally:
            args.beta = beta
        self.beta = beta
        # The micro-batch whose advantages the loss's next log-probability pass scales (see `_compute_loss`).
        self._micro_batch_to_scale = None
        if self.ref_model is None and not is_peft_model(self.model):
            raise RuntimeError(
                "ACEGRPOTrainer found no reference model after GRPOTrainer's setup; this trl version builds it "
                "differently from trl 1.16, which trl_tip supports."
            )

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"

        # The reference log-probabilities: TRL's when it scores a KL penalty (beta != 0), else one no-grad pass, the
        # same extra forward TRL's GRPO makes with a reference model.
        if output.get("ref_per_token_logps") is None:
            with (
                _rng_untouched(self.accelerator.device),
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            ):
                output[REFERENCE_LOGPS_KEY] = self._reference_completion_logps(output, mode)
        policy_logps = output.get("old_per_token_logps")
        if policy_logps is None:
            # TRL computes no sampling-time log-probabilities when the weights cannot move between generation and the
            # loss (one iteration, generation aligned with the optimiser step): its loss then takes the detached
            # log-probabilities of its own forward as π_old. The confidence shift is measured on those too, when the
            # loss computes them (`_get_per_token_logps_and_entropies`), so ACE costs no policy pass of its own.
            output[DEFERRED_SCALING_KEY] = torch.ones_like(output["advantages"], dtype=torch.bool)
        else:
            # Importance sampling (vLLM) or a generation batch spanning optimiser steps: TRL has π_old already.
            advantages = output["advantages"]
            output["advantages"], confidence_shift = self._ace_advantages(output, policy_logps)
            self._log_ace_metrics(mode, advantages, confidence_shift)
        return output

    def _reference_logps(self, batch) -> torch.Tensor:
        reference_logps = batch.get("ref_per_token_logps")
        return batch[REFERENCE_LOGPS_KEY] if reference_logps is None else reference_logps

    def _ace_advantages(self, batch, policy_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `batch`'s advantages scaled by ACE, and the confidence shift of `policy_logps` (π_old) against π_ref that
        scaled them. Local to this process: the metrics, which gather across processes, are logged by the caller.
        """
        # Tool output was not sampled from the policy: the shift sums over the tokens the policy wrote.
        confidence_shift = ace_confidence_shift(
            policy_logps, self._reference_logps(batch), model_written_mask(batch), self.args.ace_confidence
        )
        if not torch.isfinite(confidence_shift).all():
            raise FloatingPointError(
                "ACE got a non-finite confidence shift: the policy or the reference model gave a completion token a "
                "log-probability of -inf or NaN. Check the models' dtype (e.g. use bf16 rather than fp16)."
            )
        advantages = batch["advantages"]
        scaled = ace_scale_advantages(
            advantages, confidence_shift, self.args.ace_alpha, self.args.ace_transform, self.args.ace_max_factor
        )
        return scaled, confidence_shift

    def _compute_loss(self, model, inputs):
        if DEFERRED_SCALING_KEY not in inputs:
            return super()._compute_loss(model, inputs)
        # The advantages are scaled from the log-probabilities TRL's loss computes first (see
        # `_get_per_token_logps_and_entropies`), before it reads them; the micro-batch is marked for that call only.
        # The metrics gather across processes, so they are logged once the loss is computed, not inside the model's
        # forward pass, where DDP and ZeRO run collectives of their own.
        advantages = inputs["advantages"]
        self._micro_batch_to_scale = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._micro_batch_to_scale = None
        mode = "train" if self.model.training else "eval"
        self._log_ace_metrics(mode, advantages, inputs.pop(CONFIDENCE_SHIFT_KEY))
        return loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        batch, self._micro_batch_to_scale = self._micro_batch_to_scale, None
        if batch is not None:
            # TRL's loss takes these, detached, as π_old (`old_per_token_logps` is None): the same policy ACE measures.
            batch["advantages"], batch[CONFIDENCE_SHIFT_KEY] = self._ace_advantages(batch, result[0].detach())
            del batch[DEFERRED_SCALING_KEY]
        return result

    def _completion_logps(self, model, batch, mode):
        # The same call `_compute_loss` makes, on the generation batch, without gradients or entropies.
        completion_ids = batch["completion_ids"]
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([batch["prompt_ids"], completion_ids], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            completion_ids.size(1),
            batch_size=(
                self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            ),
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            num_images=batch.get("num_images"),
            pixel_attention_mask=batch.get("pixel_attention_mask"),
            spatial_shapes=batch.get("spatial_shapes"),
            num_tiles=batch.get("num_tiles"),
            image_sizes=batch.get("image_sizes"),
            token_type_ids=batch.get("token_type_ids"),
            mm_token_type_ids=batch.get("mm_token_type_ids"),
            image_position_ids=batch.get("image_position_ids"),
        )
        return logps

    def _reference_completion_logps(self, batch, mode):
        """Per-token log-probabilities of the completions under the reference model, as TRL scores its KL term."""
        if self.ref_model is not None:
            return self._completion_logps(self.ref_model, batch, mode)
        # PEFT: a new adapter disabled gives the initial model; a pretrained one has a frozen "ref" copy.
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return self._completion_logps(self.model, batch, mode)

    def _log_ace_metrics(self, mode, advantages, confidence_shift):
        shifts = self.accelerator.gather(confidence_shift).float()
        advantages = self.accelerator.gather(advantages)
        if advantages.dim() == 2:  # per-token advantages: a rollout's sign is that of its first token
            advantages = advantages[:, 0]
        factors = ace_scale_factors(shifts, self.args.ace_alpha, self.args.ace_transform, self.args.ace_max_factor)
        negative = advantages < 0
        metrics = self._metrics[mode]
        shift_quantiles = torch.quantile(shifts, torch.tensor([0.1, 0.5, 0.9], device=shifts.device))
        metrics["ace/confidence_shift_mean"].append(shifts.mean().item())
        metrics["ace/confidence_shift_min"].append(shifts.min().item())
        for name, value in zip(("p10", "p50", "p90"), shift_quantiles.tolist()):
            metrics[f"ace/confidence_shift_{name}"].append(value)
        metrics["ace/confidence_shift_max"].append(shifts.max().item())
        metrics["ace/scaled_fraction"].append((negative & (factors != 1)).float().mean().item())
        # The factor only acts on wrong rollouts; NaN when there is none (TRL's `log` leaves NaN out of the average).
        wrong = factors[negative]
        if wrong.numel():
            factor_quantiles = torch.quantile(wrong, torch.tensor([0.5, 0.9], device=wrong.device)).tolist()
            values = (wrong.mean().item(), *factor_quantiles, wrong.max().item())
        else:
            values = (float("nan"),) * 4
        for name, value in zip(("mean", "p50", "p90", "max"), values):
            metrics[f"ace/scale_factor_{name}"].append(value)
