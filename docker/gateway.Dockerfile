# wikigpt gateway: `wikigpt serve --upstream URL`, the API in front of an OpenAI-compatible server
# (vLLM on GPUs). It relays and never imports torch, so this image installs `wikigpt[gateway]`:
# no torch, no transformers (~10x smaller than the backend image, ready in under a second).
#   docker build -f docker/gateway.Dockerfile -t wikigpt/gateway .
#   docker run -e WIKIGPT_UPSTREAM=http://vllm:8000 -p 127.0.0.1:5000:5000 wikigpt/gateway
# BASE_IMAGE: as in backend.Dockerfile.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="wikigpt-gateway" \
      org.opencontainers.image.description="wikigpt API forwarding to an OpenAI-compatible server (no torch)"
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin wikigpt \
 && python3 -m venv /opt/venv && pip install -q "setuptools>=68" wheel
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gateway"]))' >/tmp/requirements.txt \
 && pip install -q -r /tmp/requirements.txt \
 && pip check
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -q --no-deps --no-build-isolation . && rm -rf build src/*.egg-info
USER wikigpt
EXPOSE 5000
# /ready follows the upstream: healthy once the upstream answers
HEALTHCHECK --interval=5s --timeout=5s --start-period=1200s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/ready', timeout=4)"]
ENTRYPOINT ["wikigpt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "5000"]
