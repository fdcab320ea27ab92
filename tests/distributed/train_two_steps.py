"""
Train a trl_tip trainer for two steps under `torchrun` on CPU (gloo) and write what the ranks saw to a JSON file.

    torchrun --standalone --nproc_per_node 2 tests/distributed/train_two_steps.py --trainer tip \
        --models DIR --output result.json

Checked by tests/test_distributed.py: the world size really is 2, losses are finite, parameters changed and are
identical on every rank afterwards, and no collective ran inside the loss (`_compute_loss` runs inside the DDP
forward, where a collective can deadlock or reorder against DDP's own).
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


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


def build_tip(models, dataset, output_dir):
    from trl_tip import TipDistillConfig, TipDistillTrainer

    args = TipDistillConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, bf16=False,
        use_cpu=True, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, token_selection="soft_or", token_ratio=0.5, seed=0,
    )
    return TipDistillTrainer(model=models["student"], teacher_model=models["teacher"], args=args,
                             train_dataset=dataset)


def build_paced(models, dataset, output_dir, **overrides):
    from trl_tip import PacedConfig, PacedTrainer

    args = PacedConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, bf16=False,
        use_cpu=True, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, pass_rate_rollouts=2, paced_alpha=0.0, paced_beta=0.0, seed=0, **overrides,
    )
    return PacedTrainer(model=models["student"], teacher_model=models["teacher"], args=args, train_dataset=dataset,
                        reward_funcs="math")


def build_opsdc(models, dataset, output_dir):
    from trl_tip import OPSDCConfig, OPSDCTrainer

    args = OPSDCConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, bf16=False,
        use_cpu=True, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, teacher_refresh_steps=1, seed=0,
    )
    return OPSDCTrainer(model=models["student"], args=args, train_dataset=dataset)


def _distinct_characters(completions, **kwargs):
    # Varies between rollouts of a random tiny model, so GRPO has non-zero advantages.
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


def build_ace(models, dataset, output_dir):
    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer

    args = ACEGRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_steps=2, learning_rate=1e-2,
        bf16=False, use_cpu=True, ddp_backend="gloo", report_to="none", logging_steps=1, save_strategy="no",
        max_completion_length=8, beta=0.0, seed=0,
    )
    return ACEGRPOTrainer(model=models["student"], reward_funcs=_distinct_characters, args=args,
                          train_dataset=dataset)


def build_paced_sample(models, dataset, output_dir):
    # α = β = 0: every problem weighs 1, so the ranks' shares are draws from the whole table.
    return build_paced(models, dataset, output_dir, paced_sampling="sample")


TRAINERS = {"tip": build_tip, "paced": build_paced, "paced_sample": build_paced_sample, "opsdc": build_opsdc,
            "ace": build_ace}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", choices=sorted(TRAINERS), required=True)
    parser.add_argument("--models", required=True, help="directory holding teacher/ and student/ (save_tiny_models)")
    parser.add_argument("--output", required=True)
    cli = parser.parse_args()

    from trl_tip.tasks import build_arithmetic_dataset

    state = {"in_loss": False, "collectives_in_loss": []}
    _watch_collectives(state)
    models = {role: os.path.join(cli.models, role) for role in ("teacher", "student")}
    dataset = build_arithmetic_dataset()["train"].select(range(32))
    trainer = TRAINERS[cli.trainer](models, dataset, os.path.dirname(os.path.abspath(cli.output)) + "/run")

    # What runs inside the DDP-wrapped forward: the distillation trainers route the whole `_compute_loss` through it;
    # GRPO (and ACE, which changes only advantages) calls the model inside its per-token log-prob pass, and reduces
    # its loss metrics across ranks afterwards, outside the forward.
    from trl import GRPOTrainer

    hook = "_get_per_token_logps_and_entropies" if isinstance(trainer, GRPOTrainer) else "_compute_loss"
    inner = getattr(trainer, hook)

    def watched(*args, **kwargs):
        state["in_loss"] = True
        try:
            return inner(*args, **kwargs)
        finally:
            state["in_loss"] = False

    setattr(trainer, hook, watched)
    # PACED's weighted sampling: the problems each rank drew, per optimiser step.
    drawn = {}
    if hasattr(trainer, "_draw_problems"):
        draw = trainer._draw_problems

        def recording_draw(rows):
            rows = draw(rows)
            drawn[trainer.state.global_step] = [row["paced_index"] for row in rows]
            return rows

        trainer._draw_problems = recording_draw
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    gathered = [torch.zeros_like(after) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(gathered, after)
    else:
        gathered = [after]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    drawn_by_rank = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(drawn_by_rank, drawn)
    else:
        drawn_by_rank = [drawn]
    if drawn:
        sampler = trainer.problem_sampler
        expected = {step: sampler.draw(step, len(share) * world_size).tolist() for step, share in drawn.items()}
    if trainer.accelerator.is_main_process:
        with open(cli.output, "w") as handle:
            json.dump(
                {
                    "world_size": world_size,
                    "losses": losses,
                    "changed": bool(not torch.equal(before, after)),
                    "identical_across_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                    "collectives_in_loss": state["collectives_in_loss"],
                    # Each rank's draws are its own slice of the one global draw of the step.
                    "draws_are_slices_of_the_global_draw": all(
                        sum((shares[step] for shares in drawn_by_rank), []) == expected[step] for step in expected
                    ) if drawn else None,
                    "draw_steps": sorted(drawn),
                },
                handle,
            )
    # Tear the process group down before the interpreter exits: left to the exit handlers, gloo's threads can abort
    # the process ("terminate called without an active exception") after a successful run.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
