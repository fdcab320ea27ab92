"""
Train trl_tip trainers for two steps each in one pair of processes on CPU (gloo) and write what the ranks saw.

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 2 \
        --mixed_precision no tests/distributed/cpu_world.py tests/distributed/train_two_steps.py \
        --engine zero3 --trainers tip,paced,opsdc,ace --models DIR --output-dir OUT

DDP runs under `torchrun --standalone --nproc_per_node 2` with `--engine ddp` (accelerate's CPU world). The engine
comes from the accelerate config the launcher read; `--engine` names the one expected, and a run whose
accelerator reports another (a silent fallback to plain DDP) fails. For each trainer, rank 0 writes `OUT/NAME.json`
(world size, losses, whether parameters changed and are identical on every rank, collectives issued inside the loss)
and `OUT/NAME.pt` (the full trained parameters, gathered from their shards), which tests/test_distributed.py checks
and compares against the DDP run.
"""

import argparse
import gc
import json
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "barrier",
               "all_gather_object", "gather", "scatter", "reduce")


def _watch_collectives(state):
    # Count collectives issued while the loss is being computed.
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            if state["in_loss"]:
                state["collectives_in_loss"].append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


# DDP on CPU is accelerate's MULTI_CPU world (`use_cpu=True`, launched by torchrun); DeepSpeed and FSDP2 need
# `use_cpu=False` (see cpu_world.py).
USE_CPU = True
# Adam's update lr·m/(√v + ε) moves by up to lr·δg/ε for a gradient error δg on an element whose gradient is
# near 0; a larger ε than the default 1e-8 bounds how far float32 reduction-order differences between engines can carry
# (see tests/test_distributed.py for the tolerance this gives).
ADAM_EPSILON = 1e-3


def build_tip(models, dataset, output_dir):
    from trl_tip import TipDistillConfig, TipDistillTrainer

    args = TipDistillConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        adam_epsilon=ADAM_EPSILON, bf16=False,
        use_cpu=USE_CPU, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, token_selection="soft_or", token_ratio=0.5, seed=0,
    )
    return TipDistillTrainer(model=models["student"], teacher_model=models["teacher"], args=args,
                             train_dataset=dataset)


def build_paced(models, dataset, output_dir, **overrides):
    from trl_tip import PacedConfig, PacedTrainer

    args = PacedConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        adam_epsilon=ADAM_EPSILON, bf16=False,
        use_cpu=USE_CPU, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, pass_rate_rollouts=2, paced_alpha=0.0, paced_beta=0.0, seed=0, **overrides,
    )
    return PacedTrainer(model=models["student"], teacher_model=models["teacher"], args=args, train_dataset=dataset,
                        reward_funcs="math")


def build_opsdc(models, dataset, output_dir):
    from trl_tip import OPSDCConfig, OPSDCTrainer

    args = OPSDCConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        adam_epsilon=ADAM_EPSILON, bf16=False,
        use_cpu=USE_CPU, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, teacher_refresh_steps=2, seed=0,
    )
    return OPSDCTrainer(model=models["student"], args=args, train_dataset=dataset)


def _distinct_characters(completions, **kwargs):
    # Varies between rollouts of a random tiny model, so GRPO has non-zero advantages.
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


def build_ace(models, dataset, output_dir):
    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer

    args = ACEGRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_steps=2, learning_rate=1e-2,
        adam_epsilon=ADAM_EPSILON,
        bf16=False, use_cpu=USE_CPU, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, beta=0.0, seed=0,
    )
    return ACEGRPOTrainer(model=models["student"], reward_funcs=_distinct_characters, args=args,
                          train_dataset=dataset)


def _first_step_reference(trainer, inputs):
    """
    This rank's share of the first step's loss of PACED or OPSDC (per-rollout normalisation), computed by hand from
    both models' full logits in float64: Σ_i w_i · mean_t KL(student || teacher) over its rollouts, and the global
    normaliser W (PACED: the weight sum; OPSDC: the rollout count, every w_i = 1). The loss of the whole two-process
    batch is Σ_ranks Σ_i w_i ℓ_i / W, what one process holding every rollout would compute. Replicated weights only
    (DDP): it deep-copies both models.
    """
    import copy

    width = inputs["completion_ids"].size(1)
    temperature = trainer.args.temperature

    def log_probs(model, prompt_ids, prompt_mask):
        model = copy.deepcopy(trainer.accelerator.unwrap_model(model)).double().eval()
        ids = torch.cat([prompt_ids, inputs["completion_ids"]], dim=1)
        mask = torch.cat([prompt_mask, inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1]
        return (logits / temperature).log_softmax(-1)

    student = log_probs(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"])
    teacher = log_probs(trainer.teacher_model, inputs.get("teacher_prompt_ids", inputs["prompt_ids"]),
                        inputs.get("teacher_prompt_mask", inputs["prompt_mask"]))
    kl = (student.exp() * (student - teacher)).sum(-1)
    mask = inputs["completion_mask"].double()
    rollout_means = (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if "paced_weights" in inputs:
        weights, normaliser = inputs["paced_weights"].double(), inputs["paced_weight_sum"].item()
    else:
        weights, normaliser = inputs["opsdc_rollout_weights"].double(), inputs["opsdc_rollout_count"][0].item()
    return (weights * rollout_means).sum().item(), normaliser


def build_paced_sample(models, dataset, output_dir):
    # α = β = 0: every problem weighs 1, so each rank's share is a draw from the whole table.
    return build_paced(models, dataset, output_dir, paced_sampling="sample")


TRAINERS = {"tip": build_tip, "paced": build_paced, "paced_sample": build_paced_sample, "opsdc": build_opsdc,
            "ace": build_ace}
ENGINES = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


def _check_engine(trainer, engine):
    # The launcher's config must have produced the engine the test asked for.
    accelerator = trainer.accelerator
    actual = accelerator.distributed_type.name
    if actual != ENGINES[engine]:
        raise RuntimeError(f"expected {engine} ({ENGINES[engine]}), the accelerator runs {actual}")
    if engine.startswith("zero"):
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage != int(engine[-1]):
            raise RuntimeError(f"expected {engine}, DeepSpeed runs ZeRO stage {stage}")
    if engine == "fsdp2" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise RuntimeError("expected FSDP2, accelerate runs FSDP1")


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every rank's copy of the whole trained student, gathered from ZeRO-3 partitions or FSDP2 shards."""
    from torch.distributed.tensor import DTensor

    model = trainer.accelerator.unwrap_model(trainer.model)
    named = list(model.named_parameters())
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().clone() for name, p in named}
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in named}


class _SnapshotWatch(TrainerCallback):
    """
    After each optimiser step (and after OPSDC's own refresh, which runs first), whether the teacher snapshot equals
    the student, gathered on every rank. With `teacher_refresh_steps=2` and two steps: frozen at step 1 (equal to the
    step-0 student, unequal to the trained one), equal again after the refresh at step 2.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.initial = None
        self.seen = {}

    def _teacher_and_student(self):
        from trl_tip.sharding import full_copy

        pairs = self.trainer._snapshot_pairs()
        return [full_copy(t).clone() for _, t, _ in pairs], [full_copy(s).clone() for _, _, s in pairs]

    def on_train_begin(self, args, state, control, **kwargs):
        self.initial, student = self._teacher_and_student()
        self.seen[0] = {
            "teacher_equals_student": all(torch.equal(t, s) for t, s in zip(self.initial, student, strict=True)),
            "refreshes": self.trainer.teacher_refreshes,
        }

    def on_step_end(self, args, state, control, **kwargs):
        teacher, student = self._teacher_and_student()
        self.seen[state.global_step] = {
            "teacher_equals_student": all(torch.equal(t, s) for t, s in zip(teacher, student, strict=True)),
            "teacher_equals_step0": all(torch.equal(t, i) for t, i in zip(teacher, self.initial, strict=True)),
            "refreshes": self.trainer.teacher_refreshes,
        }


def _uneven_pass_at_k(trainer) -> dict:
    # PassAtKCallback on a number of problems the world size does not divide: the process with fewer problems pads
    # its share, so every process makes the same sharded `generate` calls. Every rank must see all 3 problems graded.
    from trl_tip import PassAtKCallback
    from trl_tip.tasks import build_arithmetic_dataset

    problems = build_arithmetic_dataset()["test"].select(range(3))
    callback = PassAtKCallback(trainer, problems, num_samples=2, at_end=False, max_new_tokens=8)
    summary = callback.evaluate(trainer.state.global_step)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary["num_problems"])
    return {"num_problems_per_rank": gathered, "pass_at_k": summary["pass_at_k"]}


def run_one(name, engine, models, dataset, output_dir, state):
    from safetensors.torch import load_file
    from trl import GRPOTrainer

    trainer = TRAINERS[name](models, dataset, os.path.join(output_dir, f"run-{name}"))
    _check_engine(trainer, engine)
    # What runs inside the wrapped forward: the distillation trainers route the whole `_compute_loss` through it;
    # GRPO (and ACE, which changes only advantages) calls the model inside its per-token log-prob pass, and reduces
    # its loss metrics across ranks afterwards, outside the forward.
    hook = "_get_per_token_logps_and_entropies" if isinstance(trainer, GRPOTrainer) else "_compute_loss"
    inner = getattr(trainer, hook)
    reference = []

    def watched(*args, **kwargs):
        if engine == "ddp" and name in ("paced", "opsdc") and not reference and trainer.model.training:
            reference.append(_first_step_reference(trainer, args[1]))
        state["in_loss"] = True
        try:
            return inner(*args, **kwargs)
        finally:
            state["in_loss"] = False

    setattr(trainer, hook, watched)
    # PACED's weighted sampling: the problems this rank drew, per optimiser step.
    drawn = {}
    if getattr(trainer.args, "paced_sampling", None) == "sample":
        draw = trainer._draw_problems

        def recording_draw(rows):
            rows = draw(rows)
            drawn[trainer.state.global_step] = [row["paced_index"] for row in rows]
            return rows

        trainer._draw_problems = recording_draw
    state["collectives_in_loss"] = []
    snapshot_watch = None
    if name == "opsdc":
        snapshot_watch = _SnapshotWatch(trainer)
        trainer.add_callback(snapshot_watch)
    trainer.train()
    pass_at_k = None
    if name == "tip":
        pass_at_k = _uneven_pass_at_k(trainer)
    after = full_parameters(trainer)
    flat = torch.cat([p.flatten() for p in after.values()])
    world_size = dist.get_world_size()
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    reference_first_loss = None
    if reference:
        # The ranks' weighted sums add up; every rank holds the same global weight sum.
        weighted_sum = torch.tensor([reference[0][0]], dtype=torch.float64)
        dist.all_reduce(weighted_sum)
        reference_first_loss = weighted_sum.item() / reference[0][1]
    draws = None
    if drawn:
        shares = [None] * world_size
        dist.all_gather_object(shares, drawn)
        expected = {step: trainer.problem_sampler.draw(step, len(share) * world_size).tolist()
                    for step, share in drawn.items()}
        # Each rank generated for its own slice of the one global draw of the step.
        draws = {"steps": sorted(drawn), "slices_of_the_global_draw": all(
            sum((rank_shares[step] for rank_shares in shares), []) == expected[step] for step in expected)}
    initial = load_file(os.path.join(models["student"], "model.safetensors"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    teacher = getattr(trainer, "teacher_model", None)
    teacher_bytes = None
    if teacher is not None and list(teacher.parameters()):
        from trl_tip.sharding import local_numel

        params = list(trainer.accelerator.unwrap_model(teacher).parameters())
        teacher_bytes = {
            "local": sum(local_numel(p) * p.element_size() for p in params),
            "full": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params),
            # ZeRO-3 keeps parameters under `stage3_param_persistence_threshold` elements whole on every rank.
            "persistent": sum(p.ds_numel * p.element_size() for p in params if getattr(p, "ds_persist", False)),
        }
    if dist.get_rank() == 0:
        torch.save(after, os.path.join(output_dir, f"{name}.pt"))
        with open(os.path.join(output_dir, f"{name}.json"), "w") as handle:
            json.dump(
                {
                    "world_size": world_size,
                    "distributed_type": trainer.accelerator.distributed_type.name,
                    "losses": losses,
                    "grad_norms": grad_norms,
                    "learning_rate": trainer.args.learning_rate,
                    "adam_epsilon": trainer.args.adam_epsilon,
                    "teacher_parameter_bytes": teacher_bytes,
                    "changed": any(not torch.equal(initial[k], after[k]) for k in initial if k in after),
                    "identical_across_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                    "collectives_in_loss": state["collectives_in_loss"],
                    "snapshot": None if snapshot_watch is None else snapshot_watch.seen,
                    "uneven_pass_at_k": pass_at_k,
                    "reference_first_loss": reference_first_loss,
                    "paced_draws": draws,
                },
                handle,
            )
    del trainer
    gc.collect()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True, help="the engine the launcher configured")
    parser.add_argument("--trainers", default="tip,paced,opsdc,ace", help="comma-separated, run one after another")
    parser.add_argument("--models", required=True, help="directory holding teacher/ and student/ (save_tiny_models)")
    parser.add_argument("--output-dir", required=True)
    cli = parser.parse_args()
    names = cli.trainers.split(",")
    unknown = sorted(set(names) - set(TRAINERS))
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}; choose from {sorted(TRAINERS)}")

    from trl_tip.tasks import build_arithmetic_dataset

    global USE_CPU
    USE_CPU = cli.engine == "ddp"
    os.makedirs(cli.output_dir, exist_ok=True)
    state = {"in_loss": False, "collectives_in_loss": []}
    _watch_collectives(state)
    models = {role: os.path.join(cli.models, role) for role in ("teacher", "student")}
    dataset = build_arithmetic_dataset()["train"].select(range(32))
    for name in names:
        run_one(name, cli.engine, models, dataset, cli.output_dir, state)
    # Tear the process group down before the interpreter exits: left to the exit handlers, gloo's threads can abort
    # the process ("terminate called without an active exception") after a successful run.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
