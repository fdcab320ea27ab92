"""
The reproduction of docs/results.md behind `benchmarks/reproduce.py`:

- `settings`: each method's settings and variants on both tasks, the active task, what identifies a run;
- `run`: one run in its own process (train, measure, evaluate, write its JSON);
- `schedule`: which runs are missing or stale, running them a few at a time, the shipped lab pair;
- `results`: the stored results and the statistics the tables and figures share (with the page's verdict rule);
- `claims`: the papers' claims the page tests, and how each is measured from the records;
- `render`: the generated sections of docs/results.md; `plots`: its figures.
"""

from .claims import CLAIMS, claim_rows
from .render import render, render_page
from .results import load_results, mean_interval, mean_std, verdict
from .run import worker
from .schedule import SHIPPED_LAB, execute, pending_runs, seed_lab_cache
from .settings import (
    ACE_LOGGED,
    ARITHMETIC_METHODS,
    DEFAULT_DOC,
    DEFAULT_FIGURES,
    DEFAULT_OUT,
    LAB_METHODS,
    METHODS,
    OVERRIDABLE,
    ROOT,
    RUN_METHODS,
    SCRIPT,
    TASKS,
    active_task,
    row_command,
    run_dir,
    run_path,
    run_settings,
    spec_of,
    task_out,
)


__all__ = [
    "ACE_LOGGED",
    "ARITHMETIC_METHODS",
    "CLAIMS",
    "DEFAULT_DOC",
    "DEFAULT_FIGURES",
    "DEFAULT_OUT",
    "LAB_METHODS",
    "METHODS",
    "OVERRIDABLE",
    "ROOT",
    "RUN_METHODS",
    "SCRIPT",
    "SHIPPED_LAB",
    "TASKS",
    "active_task",
    "claim_rows",
    "execute",
    "load_results",
    "mean_interval",
    "mean_std",
    "pending_runs",
    "render",
    "render_page",
    "row_command",
    "run_dir",
    "run_path",
    "run_settings",
    "seed_lab_cache",
    "spec_of",
    "task_out",
    "verdict",
    "worker",
]
