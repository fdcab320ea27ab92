"""
Fixtures of the tests marked `vllm`: real vLLM engines (vLLM's CPU build) and a real `trl vllm-serve` on 127.0.0.1.

They run in the environment `make test-vllm` builds. There vLLM must be present: a missing or non-CPU vLLM fails the
tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


# vLLM's CPU engine sizes its KV cache from this (GiB); unset, it asks for a share of the whole RAM and refuses.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SERVER_START_TIMEOUT_S = 300
# Logs of the servers started in this session, shown with any failing test that used one.
_SERVER_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def vllm_on_cpu():
    """vLLM is installed and runs on its CPU platform (the environment `make test-vllm` builds)."""
    import vllm  # noqa: F401  (an ImportError here fails every test of the directory, as it should)
    from vllm.platforms import current_platform

    from trl_tip._trl_compat import vllm_runs_on_cpu

    assert current_platform.is_cpu(), f"vLLM runs on {current_platform.device_type!r}, not on its CPU platform"
    assert vllm_runs_on_cpu()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def vllm_server(model: str, log_path: Path, *extra_args: str):
    """
    `trl vllm-serve --model MODEL` on 127.0.0.1 and a free port, in float32 and eager mode, until the context ends:
    yields its base URL. The server runs in a process group of its own (vLLM starts an engine process), which is
    stopped on exit whatever happened; a server that does not come up fails with its log.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--enforce_eager", "--max_model_len", "512", *extra_args,
    ]  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115  (closed below, after the server)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _SERVER_LOGS[url] = log_path
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {server.returncode}" if server.poll() is not None else "is not up in time"
                pytest.fail(f"trl vllm-serve {state}:\n{log_path.read_text()[-6000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def served_student(tiny_model_paths, tmp_path_factory):
    """A `trl vllm-serve` of the tiny student for the whole session; trainers in server mode push their weights."""
    with vllm_server(tiny_model_paths["student"], tmp_path_factory.mktemp("server") / "vllm-serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def served_lab_teacher(tmp_path_factory):
    """A `trl vllm-serve` of the lab's shipped teacher for the whole session: the served teacher of the distillers."""
    teacher = Path(__file__).resolve().parents[1] / "data" / "lab" / "lab-v4-n1500-30-60-seed0" / "teacher"
    with vllm_server(str(teacher), tmp_path_factory.mktemp("teacher-server") / "vllm-serve.log") as url:
        yield url


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (as far as the system knows when the test starts)."""
    return _free_port()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    funcargs = getattr(item, "funcargs", {})
    for url in (funcargs.get("served_student"), funcargs.get("served_lab_teacher")):
        if report.failed and url in _SERVER_LOGS:
            report.sections.append(("trl vllm-serve log (tail)", _SERVER_LOGS[url].read_text()[-6000:]))
    return report
