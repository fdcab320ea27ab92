"""`python -m trl_tip.tasks`: prepare (or load from cache) a built-in teacher and student and print their metrics."""

import argparse
import json

from .arithmetic import ArithmeticTask, prepare_arithmetic_models
from .lab import LabTask
from .lab_preparation import prepare_lab_models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=["arithmetic", "lab"], default="arithmetic",
                        help="the addition task (the fast demo) or the lab (three levels, verbose and concise styles)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split and of model training")
    parser.add_argument("--cache_dir", default=None, help="cache root (default: $TRL_TIP_CACHE or ~/.cache/trl_tip)")
    parser.add_argument("--force", action="store_true", help="retrain even when a cached copy exists")
    args = parser.parse_args(argv)
    if args.task == "lab":
        result = prepare_lab_models(LabTask(seed=args.seed), cache_dir=args.cache_dir, force=args.force)
    else:
        result = prepare_arithmetic_models(ArithmeticTask(seed=args.seed), cache_dir=args.cache_dir, force=args.force)
    print(json.dumps(result["metrics"], indent=2))
    print(f"teacher: {result['teacher']}\nstudent: {result['student']}")


if __name__ == "__main__":
    main()
