# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both install into .venv first (the `install` target), so there is no third step.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned; on Linux, PyPI's torch==2.13.0 is the CUDA build, and on our CPU-only
# machines pip takes a local CPU wheel of the same version. For another CUDA build:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu130
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
MODEL  ?= distilbert/distilgpt2
PROMPT ?= Data Science is
PYTEST_ARGS ?=

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "wikigpt needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

run: install
	$(VENV)/bin/wikigpt generate "$(PROMPT)" --model "$(MODEL)"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
