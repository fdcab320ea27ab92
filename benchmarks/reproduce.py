"""
Every method of trl_tip against its baseline on the built-in task, several seeds, in one script.

Each run (one method variant, one seed) trains in a fresh process and writes one JSON file under the output directory
(`benchmarks/results/reproduce/<method>/<variant>/seed<k>.json`, committed with the page): test accuracy, mean
completion tokens, training wall time, peak resident memory during training, and the curves the plots need. A run
whose JSON already exists with the same settings is skipped, so an interrupted or partial reproduction resumes where it
stopped. What a run keeps besides its JSON (its `.log`, and the student the taxonomy reads, under `seed0/`) is ignored
by git. `render` turns the JSON files into the generated sections of `docs/results.md` (with the papers' claims and
their verdicts, `reproduction/claims.py`) and the figures under `docs/results/`; `render --check` only says whether
the page is what the stored records give.

    python benchmarks/reproduce.py all                       # every missing run of both tasks, then render
    python benchmarks/reproduce.py tip --seeds 0 1 2         # one method (renders afterwards)
    python benchmarks/reproduce.py tip --variants soft_or_50 --seeds 0
    python benchmarks/reproduce.py render                    # only rewrite docs/results.md and the figures
    python benchmarks/reproduce.py render --check            # exit 1 if docs/results.md is not what the records give

The teacher and the student are the built-in ones (`trl_tip.tasks.prepare_arithmetic_models()`, task seed 0) for
every run; `--seeds` sets the training seed (sampling, data order, token sampling of the random selections).
`--task lab` runs the same methods on the lab (`trl_tip.tasks.prepare_lab_models()`: three levels, verbose and
concise styles; results under `benchmarks/results/reproduce/lab/`, figures under `docs/results/lab/`), and refuses to
while the lab's preconditions do not hold (docs/lab_task.md). An empty cache starts from the lab pair shipped under
`tests/data/lab/`, the one this page's lab results were measured with.
Runs use one thread each (`OMP_NUM_THREADS=1`) and `--jobs` of them run at once (default 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# This script is the command line; the work is done by the package next to it, `reproduction/` (which reads the
# benchmarks' shared `common`). Both live next to this script (on the path already when it runs as a script).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduction import (  # noqa: E402
    ACE_LOGGED,
    ARITHMETIC_METHODS,
    CLAIMS,
    DEFAULT_DOC,
    DEFAULT_FIGURES,
    DEFAULT_OUT,
    LAB_METHODS,
    ROOT,
    RUN_METHODS,
    SHIPPED_LAB,
    TASKS,
    active_task,
    claim_rows,
    execute,
    load_results,
    mean_interval,
    mean_std,
    pending_runs,
    render,
    render_page,
    row_command,
    run_settings,
    seed_lab_cache,
    spec_of,
    task_out,
    verdict,
    worker,
)


# The names the tests and other scripts read from this module.
__all__ = ["ACE_LOGGED", "CLAIMS", "DEFAULT_OUT", "SHIPPED_LAB", "active_task", "claim_rows", "load_results", "main",
           "make_parser", "mean_interval", "mean_std", "pending_runs", "render", "render_page", "row_command",
           "run_settings", "seed_lab_cache", "task_out", "verdict"]


# --- command line --------------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for method in (*RUN_METHODS, "all"):
        sub = commands.add_parser(method, help=f"run {'every method' if method == 'all' else method}, then render")
        if method != "all":
            names = list(dict.fromkeys([*ARITHMETIC_METHODS[method]["variants"], *LAB_METHODS[method]["variants"]]))
            sub.add_argument("--variants", nargs="+", choices=names, default=None,
                             help="variants to run (default: every variant the task has)")
        sub.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        default_task = "both" if method == "all" else "arithmetic"
        sub.add_argument("--task", choices=[*TASKS, "both"], default=default_task,
                         help=f"the built-in task: the addition task, the lab (refused while its preconditions do "
                         f"not hold, see docs/lab_task.md), or both (default: {default_task})")
        sub.add_argument("--out", default=str(DEFAULT_OUT), help="directory of the per-run JSON results")
        sub.add_argument("--eval-split", choices=["test", "validation"], default="test",
                         help="split the final accuracy is measured on ('validation' to set budgets)")
        sub.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
        sub.add_argument("--max-steps", type=int, default=None,
                         help="override the method's optimiser steps (to set budgets on the validation split)")
        sub.add_argument("--learning-rate", type=float, default=None,
                         help="override the learning rate of the trained model (to set it on the validation split)")
        sub.add_argument("--force", action="store_true", help="rerun even when a current result exists")
        sub.add_argument("--no-render", action="store_true", help="do not rewrite docs/results.md and the figures")
    sub = commands.add_parser("render", help="rewrite docs/results.md and docs/results/*.png from the results")
    sub.add_argument("--out", default=str(DEFAULT_OUT))
    sub.add_argument("--doc", default=str(DEFAULT_DOC))
    sub.add_argument("--figures", default=str(DEFAULT_FIGURES))
    sub.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if the page differs from what the stored records give")
    sub = commands.add_parser("_worker")  # one run, in a fresh process
    sub.add_argument("--method", choices=RUN_METHODS, required=True)
    sub.add_argument("--task", choices=TASKS, default="arithmetic")
    sub.add_argument("--variant", required=True)
    sub.add_argument("--seed", type=int, required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--eval-split", default="test")
    sub.add_argument("--max-steps", type=int, default=None)
    sub.add_argument("--learning-rate", type=float, default=None)
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.command == "_worker":
        worker(args)
        return
    if args.command == "render" and args.check:
        if render_page(Path(args.out), Path(args.doc), Path(args.figures)) != Path(args.doc).read_text():
            raise SystemExit(f"{args.doc} is not what the records under {args.out} give: run "
                             "`python benchmarks/reproduce.py render` and commit the page.")
        print(f"{args.doc} is what the records under {args.out} give.")
        return
    if args.command == "render":
        for figure in render(Path(args.out), Path(args.doc), Path(args.figures)):
            print(f"wrote {figure}")
        return
    overrides = {"max_steps": args.max_steps, "learning_rate": args.learning_rate}
    methods = RUN_METHODS if args.command == "all" else (args.command,)
    tasks = TASKS if args.task == "both" else (args.task,)
    wall = 0.0
    for task in tasks:
        if task == "lab":
            seeded = seed_lab_cache()
            if seeded is not None:
                print(f"the lab: the pair shipped under {SHIPPED_LAB.relative_to(ROOT)} copied to {seeded} (to "
                      "prepare one on this machine instead: python -m trl_tip.tasks --task lab --force)")
        with active_task(task):
            out = task_out(Path(args.out), task)
            runs = []
            for method in methods:
                variants = list(spec_of(method)["variants"])
                if args.command != "all" and args.variants:
                    unknown = [name for name in args.variants if name not in variants]
                    if unknown:
                        raise SystemExit(f"{method} has no variant {unknown} on the {task} task; it has {variants}.")
                    variants = args.variants
                if method == "taxonomy":
                    # It reads the student after the TIP run it pictures.
                    runs += pending_runs("tip", [spec_of("taxonomy")["settings"]["tip_run"]], [0], out,
                                         args.eval_split, False, overrides)
                runs += pending_runs(method, variants, args.seeds, out, args.eval_split, args.force, overrides)
            runs = list(dict.fromkeys(runs))
            # The taxonomy run needs the TIP run it pictures: run it last.
            runs.sort(key=lambda run: run[0] == "taxonomy")
            print(f"{len(runs)} run(s) to do on the {task} task in {out}")
            taxonomy = [run for run in runs if run[0] == "taxonomy"]
            wall += execute([run for run in runs if run[0] != "taxonomy"], out, args.eval_split, args.jobs,
                            overrides)
            wall += execute(taxonomy, out, args.eval_split, args.jobs, overrides)
    print(f"wall time {wall / 60:.1f} min")
    if not args.no_render and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        for figure in render(Path(args.out)):
            print(f"wrote {figure}")


if __name__ == "__main__":
    main()
