# wikigpt web UI: `wikigpt ui`, Streamlit on port 8501. It only talks HTTP to the backend and
# never imports torch, so this image installs `wikigpt[ui]`: no torch, no transformers.
#   docker build -f docker/ui.Dockerfile -t wikigpt/ui .
# BASE_IMAGE: as in backend.Dockerfile.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="wikigpt-ui" \
      org.opencontainers.image.description="wikigpt web UI (Streamlit), a client of the wikigpt backend"
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    WIKIGPT_API_URL=http://backend:5000
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin wikigpt \
 && python3 -m venv /opt/venv && pip install -q "setuptools>=68" wheel
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["ui"]))' >/tmp/requirements.txt \
 && pip install -q -r /tmp/requirements.txt \
 && pip check
WORKDIR /app
# The page offers the notebooks for download; it looks in ./notebooks of its working directory.
COPY notebooks ./notebooks
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -q --no-deps --no-build-isolation . && rm -rf build src/*.egg-info
USER wikigpt
EXPOSE 8501
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["wikigpt"]
CMD ["ui", "--host", "0.0.0.0", "--port", "8501"]
