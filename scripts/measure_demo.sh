#!/usr/bin/env bash
# What a newcomer's `make demo` costs: a fresh clone of this repository's HEAD in a temporary folder, an empty model
# cache, then the install and the demo, timed. Prints one summary line (the numbers of "The demo, measured" in
# docs/builtin_task.md) and leaves the clone, its logs and the load average sampled every 30 s under the folder it
# names.
#
#     bash scripts/measure_demo.sh            # about 5-10 minutes on 2 CPU cores
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
git clone --quiet "$repo" "$work/clone"
cd "$work/clone"
export TRL_TIP_CACHE="$work/cache"
(while true; do cut -d' ' -f1 /proc/loadavg; sleep 30; done) > "$work/load.txt" &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT
started=$(date +%s.%N)
make .venv/.demo-stamp > "$work/install.log" 2>&1
installed=$(date +%s.%N)
make demo > "$work/demo.log" 2>&1
finished=$(date +%s.%N)
kill $sampler
metrics="$(ls "$TRL_TIP_CACHE"/arithmetic-*/metrics.json)"
python3 - "$work" "$metrics" "$started" "$installed" "$finished" "$(du -sh .venv | cut -f1)" <<'EOF'
import json, re, sys
work, metrics_path, started, installed, finished, venv_size = sys.argv[1:]
metrics = json.load(open(metrics_path))
demo = open(f"{work}/demo.log").read()
runtime = float(re.search(r"'train_runtime': '([\d.]+)'", demo).group(1))
before, after = re.findall(r"student accuracy (?:before|after): +([\d.]+)%", demo)
loads = [float(line) for line in open(f"{work}/load.txt") if line.strip()]
print(
    f"install {float(installed) - float(started):.0f} s; teacher built in {metrics['teacher_seconds']:.0f} s, both "
    f"models in {metrics['total_seconds']:.0f} s (student stopped after {metrics['student_sft_steps']} steps); TIP "
    f"training {runtime:.0f} s; make demo {float(finished) - float(installed):.0f} s, "
    f"{float(finished) - float(started):.0f} s with the install; student {before} % -> {after} %; "
    f".venv {venv_size}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on {__import__('os').cpu_count()} "
    f"cores; logs in {work}"
)
EOF
