"""
The sparse-to-dense bridge: reinforcement learning where exploration pays, then dense distillation down to the student.

Four stages, run in this order (any subset with `--stages`):

1. `teacher_rl`: GRPO on the teacher with the verifiable math reward ([`ACEGRPOTrainer`]; `ace_alpha=0` is plain GRPO);
2. `warmup`: forward-KL warm-up of the student on responses the RL-improved teacher writes ([`PacedTrainer`]);
3. `opd`: on-policy distillation, reverse KL on the student's own rollouts ([`TipDistillTrainer`]);
4. `student_rl` (optional): GRPO on the student after the bridge.

```python
from trl_tip.bridge import format_table, parse_arguments, run_bridge

script_args, shared, model_args, builtin, raw = parse_arguments(["--stages", "teacher_rl,opd"])
rows = run_bridge(script_args, shared, model_args, builtin, raw)
print(format_table(rows))
```

Modules: `arguments` (the command line), `stages` (each stage's config, trainer and recorded settings), `evaluation`
(a checkpoint's test metrics, the results table), `pipeline` (`run_bridge`: reuse, resume, records).
`examples/bridge.py` is the script.
"""

from .arguments import (
    BUILTIN_DEFAULTS,
    DEFAULT_STAGES,
    STAGES,
    BridgeScriptArguments,
    make_parser,
    parse_arguments,
    parse_stages,
)
from .evaluation import evaluate_checkpoint, format_table
from .pipeline import INPUTS_FILE, METRICS_FILE, SUMMARY_FILE, run_bridge
from .stages import CONFIG_CLASSES, TRAINS, stage_config, stage_settings, stage_trainer, train_stage


__all__ = [
    "BUILTIN_DEFAULTS",
    "CONFIG_CLASSES",
    "DEFAULT_STAGES",
    "INPUTS_FILE",
    "METRICS_FILE",
    "STAGES",
    "SUMMARY_FILE",
    "TRAINS",
    "BridgeScriptArguments",
    "evaluate_checkpoint",
    "format_table",
    "make_parser",
    "parse_arguments",
    "parse_stages",
    "run_bridge",
    "stage_config",
    "stage_settings",
    "stage_trainer",
    "train_stage",
]
