"""
Hugging Face `evaluate` metrics shipped with trl_tip, as local metric modules (no Hub download).

- `math_pass_at_k/`: unbiased pass@k, mean@n and the ungradable count of sampled math completions, graded by
  `trl_tip.evaluation` (load it with [`trl_tip.evaluation.load_metric`] or `evaluate.load(METRIC_PATHS[...])`).
"""

from pathlib import Path


METRICS_DIR = Path(__file__).resolve().parent
# Name -> the directory `evaluate.load` reads (the script inside has the directory's name).
METRIC_PATHS = {"math_pass_at_k": str(METRICS_DIR / "math_pass_at_k")}

__all__ = ["METRICS_DIR", "METRIC_PATHS"]
