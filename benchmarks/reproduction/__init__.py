"""
The reproduction of docs/results.md behind `benchmarks/reproduce.py`:

- `settings`: each method's settings and variants on both tasks, the active task, what identifies a run;
- `run`: one run in its own process (train, measure, evaluate, write its JSON);
- `schedule`: which runs are missing or stale, running them a few at a time, the shipped lab pair;
- `results`: the stored results and the statistics the tables and figures share;
- `render`: the generated sections of docs/results.md; `plots`: its figures.
"""

from .render import render
from .results import load_results, mean_std
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
    "execute",
    "load_results",
    "mean_std",
    "pending_runs",
    "render",
    "row_command",
    "run_dir",
    "run_path",
    "run_settings",
    "seed_lab_cache",
    "spec_of",
    "task_out",
    "worker",
]
