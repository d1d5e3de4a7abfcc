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
API_PORT ?= 5000
UI_PORT  ?= 8501
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

# The API and the web UI together, on 127.0.0.1. Ctrl-C stops both, and so does either one
# exiting (e.g. a model that cannot be found). Plain sh, no `wait -n`: macOS ships bash 3.2.
run: install
	@trap 'kill $$api $$ui 2>/dev/null; wait' EXIT; trap 'exit 130' INT TERM; \
	$(VENV)/bin/wikigpt serve --model "$(MODEL)" --host 127.0.0.1 --port $(API_PORT) & api=$$!; \
	$(VENV)/bin/wikigpt ui --api-url http://127.0.0.1:$(API_PORT) --host 127.0.0.1 --port $(UI_PORT) & ui=$$!; \
	echo "wikigpt: API http://127.0.0.1:$(API_PORT)  web UI http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops both)"; \
	while kill -0 $$api 2>/dev/null && kill -0 $$ui 2>/dev/null; do sleep 1; done; \
	echo "wikigpt: the API or the UI stopped (see above); stopping the other" >&2; exit 1

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
