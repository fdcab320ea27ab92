"""One run of `benchmarks/reproduce.py` (a method variant, a seed), in its own process: train, measure, evaluate."""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, reset_peak_rss, save_json, status_kib

from .settings import (
    _ACTIVE_TASK,
    ACE_LOGGED,
    SCRIPT,
    active_task,
    row_command,
    run_dir,
    run_path,
    run_settings,
    spec_of,
)


# --- measurement helpers (worker side) -----------------------------------------------------------------------------


def _train_measured(trainer) -> dict:
    """
    Train; return the wall and CPU time of training and its peak resident memory (absolute and above the loaded
    state). With one thread per run, CPU time is what the run costs whatever else the machine is doing.
    """
    loaded = status_kib("VmRSS") / 1024
    reset_peak_rss()
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    peak = status_kib("VmHWM") / 1024
    return {"train_seconds": seconds, "train_cpu_seconds": cpu, "loaded_rss_mib": loaded, "peak_rss_mib": peak,
            "peak_above_loaded_mib": peak - loaded}


def _log_series(trainer, keys: tuple[str, ...]) -> dict:
    series = defaultdict(list)
    for entry in trainer.state.log_history:
        if "step" in entry:
            for key in keys:
                if key in entry:
                    series[key].append([entry["step"], entry[key]])
    return dict(series)


def _common_config(settings: dict, seed: int, output_dir: str) -> dict:
    keys = ("max_steps", "per_device_train_batch_size", "learning_rate", "max_completion_length", "temperature")
    config = {key: settings[key] for key in keys}
    for key in ("lr_scheduler_type", "warmup_steps"):
        if key in settings:
            config[key] = settings[key]
    return {**config, "output_dir": output_dir, "seed": seed, "logging_steps": 10, "save_strategy": "no",
            "report_to": "none", "bf16": False, "gradient_checkpointing": False, "disable_tqdm": True}


def _worker_tip(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl_tip import TipDistillConfig, TipDistillTrainer

    config = TipDistillConfig(**_common_config(settings, settings["seed"], output_dir),
                              token_selection=settings["token_selection"], token_ratio=settings["token_ratio"],
                              divergence_clip_quantile=settings.get("divergence_clip_quantile", 1.0),
                              selection_divergence=settings.get("selection_divergence", "reverse_kl"))
    trainer = TipDistillTrainer(model=prepared["student"], teacher_model=prepared["teacher"], args=config,
                                train_dataset=prepared["dataset"]["train"], processing_class=tokenizer)
    result = _train_measured(trainer)
    keys = ("loss", "tip/kept_fraction", "tip/q1_share", "tip/q2_share", "tip/q3_share", "tip/q4_share",
            "tip/divergence_hat_p50", "tip/divergence_hat_p90")
    result["history"] = _log_series(trainer, keys)
    result["model"] = trainer.model
    if settings["variant"] == spec_of("taxonomy")["settings"]["tip_run"] and settings["seed"] == 0:
        # The taxonomy figure reads the student after this run.
        trainer.model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
    return result


def _worker_paced(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl_tip import PacedConfig, PacedTrainer

    train = prepared["dataset"]["train"].select(range(settings["num_train_problems"]))
    config = PacedConfig(**_common_config(settings, settings["seed"], output_dir),
                         paced_alpha=settings["paced_alpha"], paced_beta=settings["paced_beta"],
                         kl_schedule=settings["kl_schedule"], pass_rate_rollouts=settings["pass_rate_rollouts"],
                         paced_sampling=settings.get("paced_sampling", "weight"),
                         self_distillation=settings.get("self_distillation", False),
                         teacher_completions=settings.get("teacher_completions", "auto"))
    # Self-distillation: the teacher is a frozen copy of the student reading the reference solution.
    teacher = None if config.self_distillation else prepared["teacher"]
    trainer = PacedTrainer(model=prepared["student"], teacher_model=teacher, args=config,
                           train_dataset=train, processing_class=tokenizer, reward_funcs=["math"])
    estimate, spent, spent_cpu = trainer.estimate_pass_rates, [], []

    def timed_estimate():
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            return estimate()
        finally:
            spent.append(time.perf_counter() - started)
            spent_cpu.append(time.process_time() - started_cpu)

    trainer.estimate_pass_rates = timed_estimate
    result = _train_measured(trainer)
    result["estimation_seconds"] = sum(spent)
    result["estimation_cpu_seconds"] = sum(spent_cpu)
    result["pass_rate_histogram"] = trainer.pass_rate_table.histogram()
    table = trainer.pass_rate_table
    weights = table.weights(settings["paced_alpha"], settings["paced_beta"]).double()
    result["training_rollouts"] = trainer._training_rollouts
    result["estimation_rollouts"] = table.estimates * len(table) * settings["pass_rate_rollouts"]
    # Kish effective sample size of a uniformly drawn weighted batch, per rollout: (E w)² / E w².
    result["weighted_batch_ess_fraction"] = (weights.mean() ** 2 / (weights**2).mean()).item()
    result["history"] = _log_series(trainer, ("loss", "paced/weight_mean", "paced/zero_weight_share"))
    result["model"] = trainer.model
    return result


def _worker_opsdc(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from transformers import TrainerCallback

    from trl_tip import OPSDCConfig, OPSDCTrainer, build_teacher_prompt, math_reward

    curve_set = prepared["dataset"]["validation"].select(range(settings["curve_problems"]))
    curve, spent, spent_cpu = [], [], []

    class Curve(TrainerCallback):
        def _measure(self, model, step):
            started, started_cpu = time.perf_counter(), time.process_time()
            measured = _evaluate(model, tokenizer, curve_set, settings["max_completion_length"])
            point = [step, measured["accuracy"], measured["mean_completion_tokens"]]
            if "levels" in measured:
                point.append({level: [m["accuracy"], m["mean_completion_tokens"]]
                              for level, m in measured["levels"].items()})
            curve.append(point)
            spent.append(time.perf_counter() - started)
            spent_cpu.append(time.process_time() - started_cpu)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings["curve_every"] == 0:
                self._measure(model, state.global_step)

    config = OPSDCConfig(**_common_config(settings, settings["seed"], output_dir),
                         concise_instruction=settings["concise_instruction"],
                         teacher_refresh_steps=settings["teacher_refresh_steps"])
    # The competent built-in model (the teacher of the other methods) is the one whose reasoning could be compressed.
    trainer = OPSDCTrainer(model=prepared["teacher"], args=config, train_dataset=prepared["dataset"]["train"],
                           processing_class=tokenizer, reward_funcs=[math_reward], callbacks=[Curve()])
    test = prepared["dataset"][settings["eval_split"]]
    instructed = test.map(lambda row: {"prompt": build_teacher_prompt(row["prompt"], trainer.concise_instruction)[0]})
    before = _evaluate(trainer.model, tokenizer, test, settings["max_completion_length"])
    teachers_view = _evaluate(trainer.model, tokenizer, instructed, settings["max_completion_length"])
    result = _train_measured(trainer)
    # Curve evaluations ran inside `train`; they are not training.
    result["train_seconds"] -= sum(spent)
    result["train_cpu_seconds"] -= sum(spent_cpu)
    result["before"] = before
    result["teachers_view"] = teachers_view
    result["curve"] = curve
    result["history"] = _log_series(trainer, ("loss", "completions/mean_length", "opsdc/accuracy",
                                              "opsdc/compression", "opsdc/teacher_refreshes"))
    result["model"] = trainer.model
    return result


def _worker_ace(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl import GRPOTrainer

    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer, evaluate_pass_at_k, math_reward

    test = prepared["dataset"][settings["eval_split"]]

    def pass_at_k(model):
        measured = evaluate_pass_at_k(model, tokenizer, test, num_samples=settings["eval_samples"],
                                      max_new_tokens=settings["max_completion_length"],
                                      temperature=settings["temperature"], seed=settings["seed"])
        return {**measured, "pass_at_k": {str(k): v for k, v in measured["pass_at_k"].items()}}

    config = ACEGRPOConfig(**_common_config(settings, settings["seed"], output_dir),
                           num_generations=settings["num_generations"], loss_type=settings["loss_type"],
                           beta=settings["beta"], ace_alpha=settings["ace_alpha"],
                           ace_confidence=settings.get("ace_confidence", "sum"))
    # The baseline is TRL's own trainer (ACE with α = 0 is the same update; the baseline needs no ACE code at all).
    trainer_class = GRPOTrainer if settings["ace_alpha"] == 0 else ACEGRPOTrainer
    trainer = trainer_class(model=prepared["student"], reward_funcs=[math_reward], args=config,
                            train_dataset=prepared["dataset"]["train"], processing_class=tokenizer)
    before = pass_at_k(trainer.model)
    result = _train_measured(trainer)
    result["before_pass_at_k"] = before
    result["pass_at_k"] = pass_at_k(trainer.model)
    result["history"] = _log_series(trainer, ("loss", "reward", *ACE_LOGGED))
    result["model"] = trainer.model
    return result


def _worker_bridge(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    """Run `examples/bridge.py` in this process (its stages, its evaluation), timing and measuring each stage."""
    import importlib.util

    from trl_tip.bridge import pipeline

    spec = importlib.util.spec_from_file_location("_bridge_example", ROOT / "examples" / "bridge.py")
    bridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bridge)
    stage_costs = {}
    train_stage = pipeline.train_stage

    def measured_stage(stage, *args, **kwargs):
        loaded = status_kib("VmRSS") / 1024
        reset_peak_rss()
        started, started_cpu = time.perf_counter(), time.process_time()
        metrics = train_stage(stage, *args, **kwargs)
        peak = status_kib("VmHWM") / 1024
        stage_costs[stage] = {"train_seconds": time.perf_counter() - started,
                              "train_cpu_seconds": time.process_time() - started_cpu, "loaded_rss_mib": loaded,
                              "peak_rss_mib": peak, "peak_above_loaded_mib": peak - loaded}
        return metrics

    argv = ["--output_dir", output_dir, "--seed", str(settings["seed"]), "--stages", settings["stages"],
            "--dataset_test_split", settings["eval_split"], "--eval_num_samples", str(settings["eval_samples"]),
            "--eval_temperature", str(settings["temperature"]), "--gradient_checkpointing", "False"]
    for key in ("num_train_problems", "per_device_train_batch_size", "num_generations", "max_completion_length",
                "temperature", "teacher_rl_max_steps", "teacher_rl_learning_rate", "warmup_max_steps",
                "warmup_learning_rate", "opd_max_steps", "opd_learning_rate"):
        argv += [f"--{key}", str(settings[key])]
    if _ACTIVE_TASK[0] == "lab":
        argv += ["--builtin_task", "lab"]
    if "max_steps" in settings:  # direct student GRPO
        argv += ["--student_rl_max_steps", str(settings["max_steps"]),
                 "--student_rl_learning_rate", str(settings["learning_rate"])]
    pipeline.train_stage = measured_stage  # what the pipeline calls to train each stage
    try:
        rows = bridge.main(argv)
    finally:
        pipeline.train_stage = train_stage
    final = rows[-1]["test"]
    costs = list(stage_costs.values())
    return {
        "train_seconds": sum(c["train_seconds"] for c in costs),
        "train_cpu_seconds": sum(c["train_cpu_seconds"] for c in costs),
        "peak_rss_mib": max(c["peak_rss_mib"] for c in costs),
        "peak_above_loaded_mib": max(c["peak_above_loaded_mib"] for c in costs),
        "stage_costs": stage_costs,
        "stages": [{"stage": row["stage"], "model": row["model"], "test": row["test"]} for row in rows],
        "eval": {"accuracy": final["greedy_accuracy"],
                 "mean_completion_tokens": final["greedy_mean_completion_tokens"],
                 "num_problems": final["num_problems"]},
        "sampled": {"mean_accuracy": final["mean_accuracy"], "pass_at_k": final["pass_at_k"],
                    "mean_completion_tokens": final["mean_completion_tokens"]},
    }


def _worker_taxonomy(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_tip import select_tokens, token_stats
    from trl_tip.selection import quadrant_counts, quantile

    trained = run_dir(out, "tip", settings["tip_run"], 0) / "model"
    if not trained.exists():
        raise FileNotFoundError(f"{trained} is missing: run `python {SCRIPT} tip --variants {settings['tip_run']} "
                                "--seeds 0` first (its student after training is saved there).")
    teacher = AutoModelForCausalLM.from_pretrained(prepared["teacher"]).eval()
    prompts = list(prepared["dataset"]["train"]["prompt"][: settings["rollouts"]])
    panels = {}
    for name, path in (("before", prepared["student"]), ("after", str(trained))):
        student = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(settings["seed"])
        batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              padding=True, return_tensors="pt")
        with torch.no_grad():
            sequences = student.generate(**batch, max_new_tokens=settings["max_completion_length"], do_sample=True,
                                         temperature=settings["temperature"], top_p=None, top_k=None,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            prompt_width = batch["input_ids"].shape[1]
            completion = sequences[:, prompt_width:]
            # Completion tokens up to and including the first end of turn, as the trainers mask them.
            is_eos = completion == tokenizer.eos_token_id
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            mask = ~after_eos
            attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
            # The hidden state at position t - 1 predicts completion token t.
            positions = slice(prompt_width - 1, sequences.shape[1] - 1)
            h_s = student.model(input_ids=sequences, attention_mask=attention).last_hidden_state[:, positions]
            h_t = teacher.model(input_ids=sequences, attention_mask=attention).last_hidden_state[:, positions]
            stats = token_stats(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                temperature=settings["temperature"])
            kept = select_tokens(stats.entropy, stats.reverse_kl, mask, method="soft_or", ratio=0.5)
        h, d = stats.entropy[mask], stats.reverse_kl[mask]
        counts = quadrant_counts(stats.entropy, stats.reverse_kl, mask)
        kept_counts = torch.zeros(4)
        high_h, high_d = h > quantile(h, 0.5), d > quantile(d, 0.5)
        quadrant = torch.where(high_h & high_d, 1, torch.where(high_h, 2, torch.where(high_d, 3, 4)))
        kept_flat = kept[mask]
        for q in range(4):
            kept_counts[q] = (kept_flat & (quadrant == q + 1)).sum()
        panels[name] = {
            "entropy": [round(x, 6) for x in h.tolist()],
            "reverse_kl": [round(x, 6) for x in d.tolist()],
            "quadrant": quadrant.tolist(),
            "soft_or_kept": kept_flat.int().tolist(),
            "quadrant_shares": (counts / counts.sum()).tolist(),
            "soft_or_kept_by_quadrant": (kept_counts / counts.clamp(min=1)).tolist(),
            "median_entropy": quantile(h, 0.5).item(),
            "median_reverse_kl": quantile(d, 0.5).item(),
            "tokens": int(mask.sum()),
        }
    return {"panels": panels}


def worker(args) -> None:

    import torch

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    with active_task(args.task):
        _work(args, started_wall, started_cpu)


def _prepared_models() -> dict:
    """The active task's teacher, student and splits (trained on first use, then cached)."""
    if _ACTIVE_TASK[0] == "lab":
        from trl_tip.tasks import prepare_lab_models

        prepared = prepare_lab_models(verbose=False)
        failures = prepared["metrics"]["precondition_failures"]
        if failures:
            # The lab is an instrument only when its preconditions hold; a method's result on it would mean nothing.
            raise SystemExit(f"The lab's preconditions do not hold ({'; '.join(failures)}); see "
                             f"{Path(prepared['teacher']).parent / 'metrics.json'}. No method is run on it.")
        return prepared
    from trl_tip.tasks import prepare_arithmetic_models

    return prepare_arithmetic_models(verbose=False)


def _evaluate(model, tokenizer, dataset, max_new_tokens: int) -> dict:
    """Greedy accuracy and mean completion tokens; on the lab also per level (`levels`)."""
    if _ACTIVE_TASK[0] == "lab":
        from trl_tip.tasks import accuracy_by_level

        return accuracy_by_level(model, tokenizer, dataset, max_new_tokens=max_new_tokens)
    from trl_tip.tasks import evaluate_accuracy

    return evaluate_accuracy(model, tokenizer, dataset, max_new_tokens=max_new_tokens)


def _work(args, started_wall: float, started_cpu: float) -> None:
    import resource

    import torch
    from transformers import AutoTokenizer

    out = Path(args.out)
    overrides = {"max_steps": args.max_steps, "learning_rate": args.learning_rate}
    settings = run_settings(args.method, args.variant, args.seed, args.eval_split, overrides)
    path = run_path(out, args.method, args.variant, args.seed)
    directory = run_dir(out, args.method, args.variant, args.seed)
    prepared = _prepared_models()
    tokenizer = AutoTokenizer.from_pretrained(prepared["student"], padding_side="left")
    with tempfile.TemporaryDirectory() as output_dir:
        if args.method == "taxonomy":
            result = _worker_taxonomy(settings, prepared, tokenizer, output_dir, directory, out)
        elif args.method == "bridge":
            # The pipeline evaluates its own models (greedy and sampled), on the split asked for.
            result = _worker_bridge(settings, prepared, tokenizer, output_dir, directory)
        else:
            workers = {"tip": _worker_tip, "paced": _worker_paced, "opsdc": _worker_opsdc, "ace": _worker_ace}
            work = workers[args.method]
            result = work(settings, prepared, tokenizer, output_dir, directory)
            model = result.pop("model")
            result["eval"] = _evaluate(model, tokenizer, prepared["dataset"][args.eval_split],
                                       settings["max_completion_length"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "settings": settings,
        "command": row_command(args.method, args.variant, [args.seed], settings),
        "student_before": prepared["metrics"]["student_test_accuracy"],
        "teacher": prepared["metrics"]["teacher_test_accuracy"],
        **result,
        "process_wall_seconds": time.perf_counter() - started_wall,
        "process_cpu_seconds": time.process_time() - started_cpu,
        "process_max_rss_mib": usage.ru_maxrss / 1024,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    save_json(path, record, newline=False)
