# Everything runs from a local virtual environment that the first target creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,quantization]"
	touch $(STAMP)

install: $(STAMP)

# The main job: prepare the built-in teacher and student, offline, on CPU, and print their test accuracy.
demo: $(STAMP)
	$(PY) -m trl_tip.tasks

# The whole suite, slow tests included. pytest exits 5 when it collects nothing: say so rather than fail.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
