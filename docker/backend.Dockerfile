# wikigpt backend: `wikigpt serve`, the HTTP API on port 5000. Built from the repository root:
#   docker build -f docker/backend.Dockerfile -t wikigpt/backend .
# Build arguments:
#   BASE_IMAGE   any Debian-like image with python3 >= 3.11 and venv; a local one where no
#                registry is reachable (CI: .ci/docker-engine.sh)
#   TORCH        the torch requirement, pinned like the Makefile's
#   TORCH_INDEX  where torch comes from: PyTorch's CPU wheels by default (PyPI's Linux torch is the
#                CUDA build, GBs); for NVIDIA GPUs e.g. https://download.pytorch.org/whl/cu130
# A torch wheel dropped into docker/wheels/ wins over TORCH_INDEX: offline builds (CI does this).
# One stage on purpose: a build stage plus `COPY --from` of the 1.5 GB venv measured ~75 s more
# per build here, and the wheel left in a layer only exists in offline builds.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="wikigpt-backend" \
      org.opencontainers.image.description="wikigpt HTTP API: POST /predict and OpenAI-compatible /v1/completions"
# HF_HOME on /cache: compose mounts a named volume there so a Hub model downloads once.
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
# setuptools/wheel in the venv: our own package installs below without a network round-trip.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin wikigpt \
 && mkdir -p /cache/huggingface /models && chown wikigpt:wikigpt /cache/huggingface \
 && python3 -m venv /opt/venv && pip install -q "setuptools>=68" wheel
# Layers from the slowest-changing down: torch, the dependencies named in pyproject.toml, then
# our source, so editing src/ rebuilds in seconds. torch comes alone, without dependencies, from
# its index (which serves the CPU or a CUDA build); its dependencies and everything else then come
# from the normal index, and the pinned torch already installed satisfies the rest.
COPY docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
      pip install -q --no-deps --no-index --find-links /tmp/wheels "$TORCH"; \
    else \
      pip install -q --no-deps --index-url "$TORCH_INDEX" "$TORCH"; \
    fi
COPY pyproject.toml /tmp/pyproject.toml
# the `serve` extra: what `wikigpt serve` needs, not the training stack
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["serve"]))' >/tmp/requirements.txt \
 && pip install -q -r /tmp/requirements.txt "$TORCH" \
 && pip check
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -q --no-deps --no-build-isolation . && rm -rf build src/*.egg-info
# wikigpt's CPU kernels (int8 product, one row's attention), compiled where the base image has a
# C++ compiler; without one the server logs why and serves int8 through FBGEMM where exact, else
# full precision (docs/engine.md)
ENV WIKIGPT_KERNEL_DIR=/opt/wikigpt-kernels
RUN python3 -m wikigpt.q8kernel
USER wikigpt
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/ready', timeout=4)"]
ENTRYPOINT ["wikigpt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "5000"]
