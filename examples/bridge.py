"""
The sparse-to-dense bridge: reinforcement learning where exploration pays, then dense distillation down to the student.

Four stages, run in this order (any subset with `--stages`):

1. `teacher_rl`: GRPO on the teacher with the verifiable math reward (`ACEGRPOTrainer`; `--ace_alpha 0`, the default
   here, is plain GRPO, `--ace_alpha 1` adds ACE's confidence-aware penalty on wrong rollouts);
2. `warmup`: forward-KL warm-up of the student on responses the RL-improved teacher writes (`PacedTrainer` with
   `rollout_source="teacher"`, `kl_schedule="forward"`, `teacher_completions="generate"`, uniform weights);
3. `opd`: on-policy distillation, reverse KL on the student's own rollouts, from the RL-improved teacher
   (`TipDistillTrainer`, `--token_selection all` by default, any TIP rule optional);
4. `student_rl` (optional, not in the default `--stages`): GRPO on the student after the bridge.

Each stage writes its checkpoint and a `metrics.json` (test accuracy, mean@n / pass@k, timings) under
`output_dir/<stage>/`. A stage whose `metrics.json` exists is reused, not retrained (unless `--overwrite_stages`), so
rerunning the same command resumes the pipeline; an interrupted stage resumes from its last checkpoint. The pipeline
itself lives in `trl_tip.bridge` (`run_bridge`); this script parses the command line, runs it and prints the table.

With no arguments, runs on the built-in task (offline, CPU, 1-2 minutes) with the built-in teacher and student, and
prints the test accuracy after each stage:

```bash
python examples/bridge.py
python examples/bridge.py --stages teacher_rl,warmup,opd,student_rl --ace_alpha 1.0
```

On real models (every stage reads the same shared training arguments; the few that must differ per stage have
stage-prefixed versions, e.g. `--warmup_max_steps`, `--opd_learning_rate`; or `--config recipe.yaml`):

```bash
accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/bridge.py \
    --config recipes/bridge_qwen3-1.7b.yaml
accelerate launch examples/bridge.py \
    --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name open-r1/DAPO-Math-17k-Processed --dataset_config all --answer_column solution \
    --teacher_rl_max_steps 200 --warmup_max_steps 100 --opd_max_steps 300 \
    --learning_rate 1e-6 --lr_scheduler_type cosine --max_completion_length 8192 \
    --output_dir Qwen3-1.7B-bridge
```
"""

from accelerate import PartialState

from trl_tip.bridge import format_table, parse_arguments, run_bridge
from trl_tip.bridge import make_parser  # noqa: F401 (this script's parser, as tests/test_docs.py reads it)
from trl_tip.script_utils import end_distributed


def main(argv: list[str] | None = None) -> list[dict]:
    script_args, shared, model_args, builtin, raw = parse_arguments(argv)
    rows = run_bridge(script_args, shared, model_args, builtin, raw)
    if PartialState().is_main_process:
        print(format_table(rows, test_name="built-in test" if builtin and not script_args.eval_benchmark else "test"))
    return rows


if __name__ == "__main__":
    main()
    end_distributed()
