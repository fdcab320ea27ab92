"""
What the benchmark scripts share: the generated sections of the docs they write, the worker processes they measure in,
the peak resident memory those workers read, the description of the machine and versions a measurement ran on, and
their JSON files.

The scripts import it as `common` (their own directory is on `sys.path` when they run, and they put it there when
imported from elsewhere).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# Tells glibc to return large blocks to the system, so that a freed block is not reused unseen by a peak-memory
# measurement (the workers that read VmHWM run with it).
RETURN_LARGE_BLOCKS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# --- the docs' generated sections ------------------------------------------------------------------------------------


def write_section(path: str, name: str, text: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}{end}"
    content = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        content = before + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as handle:
        handle.write(content)


# --- worker processes ------------------------------------------------------------------------------------------------


def worker_env(*, pythonpath: bool = False, **settings: str) -> dict[str, str]:
    """
    The environment of a worker process: this one's, offline (`HF_HUB_OFFLINE=1`), with `settings` (e.g.
    `OMP_NUM_THREADS="1"`, `**RETURN_LARGE_BLOCKS`) and, with `pythonpath`, the repository first on `PYTHONPATH`.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **settings}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env


def run_worker_process(command: list[str], what: str, env: dict[str, str], cwd: Path | None = None,
                       stderr_tail: int = 3000) -> dict:
    """
    Run a worker to completion and return the JSON object it printed on its last line of output.

    Raises:
        `RuntimeError`: naming `what` with the end of the worker's stderr, when it exits with an error.
    """
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-stderr_tail:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- peak resident memory (Linux) ------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    """A field of `/proc/self/status` in KiB (`VmRSS`: resident memory now, `VmHWM`: its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the peak resident memory (VmHWM) to the current resident memory."""
    # Writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# --- where and with what a measurement ran -------------------------------------------------------------------------


def device_name(cuda: bool, cpu_note: str | None = "one thread per worker") -> str:
    """The GPU's name, or `CPU (<n> cores[, cpu_note])`."""
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores{', ' + cpu_note if cpu_note else ''})"


def versions(vllm: bool = False) -> dict[str, str]:
    """The versions of Python and torch (and vLLM) a measurement ran with."""
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    if vllm:
        import vllm as vllm_module

        found["vllm"] = vllm_module.__version__
    return found


def describe_versions(python: bool = True) -> str:
    """`3.12.3, torch 2.13.0+cpu` (without Python's version when `python=False`), as the sections cite them."""
    found = versions()
    return f"{found['python']}, torch {found['torch']}" if python else f"torch {found['torch']}"


def command_line() -> str:
    """The command this process was started with, as a section cites it."""
    return "python " + " ".join(sys.argv)


# --- JSON files ------------------------------------------------------------------------------------------------------


def save_json(path: str | Path, value, newline: bool = True) -> None:
    """Write `value` as indented JSON (one space), creating the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + ("\n" if newline else ""))


def load_json(path: str | Path):
    return json.loads(Path(path).read_text())
