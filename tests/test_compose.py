"""Docker Compose deployment against a real Docker engine: both images build, the stack comes up
with a tiny model directory mounted read-only, the original curl call works on the published
backend port, the UI page in a real browser shows the backend ready, and everything the test
made is brought down and removed.

Needs a Docker engine and Compose (v1 `docker-compose` or the v2 plugin); skips with the reason
otherwise (fails with it under CI=true). `.ci/docker-engine.sh up` provides both on a Debian machine, plus a local base image
(no registry reachable there) that is used when present. The built images are kept, tagged
`wikigpt/{backend,ui}:test`, as the build cache of the next run (like the base image); a rebuild
removes the version it replaces, WIKIGPT_DOCKER_KEEP_IMAGES=0 removes them at the end.
Environment: WIKIGPT_DOCKER_BASE_IMAGE (default: the CI base when present, else the
Dockerfiles' python:3.12-slim).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import free_port, require

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
# Debian's CLI matches its engine; a newer CLI found first on PATH may insist on buildx.
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")
CI_BASE_IMAGE = "local/python:3.11-bookworm"  # what .ci/docker-engine.sh builds
TAG = "test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Data Science is"


def sh(*args: str, timeout: float = 60, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def engine_problem() -> str | None:
    try:
        info = subprocess.run([DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: `{DOCKER} info` failed ({exc})"
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers ({why}); `sudo .ci/docker-engine.sh up` starts one"
    return None


def compose_command() -> list[str] | None:
    """Compose v1 (`docker-compose`) or the v2 plugin (`docker compose`), whichever exists."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run([DOCKER, "compose", "version"], capture_output=True, timeout=20)
    return [DOCKER, "compose"] if probe.returncode == 0 else None


def image_id(ref: str) -> str | None:
    proc = sh(DOCKER, "image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def base_image() -> str:
    chosen = os.environ.get("WIKIGPT_DOCKER_BASE_IMAGE")
    if chosen:
        return chosen
    return CI_BASE_IMAGE if image_id(CI_BASE_IMAGE) else "python:3.12-slim"


def feed_local_torch_wheel(base: str) -> Path | None:
    """Put a torch wheel that pip finds on this machine without any index (its find-links) into
    docker/wheels/, for the base image's Python, so the backend builds offline; None when there
    is none (the build then downloads torch from TORCH_INDEX). Returns the file it added."""
    pin = re.search(r"^ARG TORCH=(\S+)", (REPO / "docker" / "backend.Dockerfile").read_text(), re.M).group(1)
    pyver = sh(DOCKER, "run", "--rm", "--entrypoint", "python3", base, "-c",
               "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')", timeout=120).stdout.strip()
    wheels = REPO / "docker" / "wheels"
    before = set(wheels.glob("torch-*.whl"))
    if before:
        return None  # the user's own wheel: use it, leave it
    with tempfile.TemporaryDirectory() as tmp:
        got = sh(sys.executable, "-m", "pip", "download", "-q", "--no-index", "--no-deps",
                 "--python-version", pyver, "-d", tmp, pin, check=False, timeout=300)
        found = list(Path(tmp).glob("torch-*.whl"))
        if got.returncode != 0 or not found:
            return None
        target = wheels / found[0].name
        shutil.move(found[0], target)
        return target


def project_leftovers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    left = []
    for kind in ("container", "network", "volume"):
        args = [DOCKER, kind, "ls", "-q", "--filter", label] + (["-a"] if kind == "container" else [])
        left += [f"{kind} {x}" for x in sh(*args).stdout.split()]
    return left


@pytest.fixture(scope="module")
def stack():
    problem = engine_problem()
    require(problem is None, problem or "")
    compose = compose_command()
    require(compose is not None, "no Docker Compose: neither `docker-compose` (v1) nor the `docker compose` plugin (v2)")
    from tests.conftest import make_tiny_model

    timings: dict[str, float] = {}
    # The container runs as uid 1000 and must read the model: a world-readable dir of its own
    # (pytest's temp dirs are 0700).
    model_dir = Path(tempfile.mkdtemp(prefix="wikigpt-compose-model-"))
    make_tiny_model(model_dir)
    for path in [model_dir, *model_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    project = f"wikigpt-test-{os.getpid()}"
    ports = {"backend": free_port(), "ui": free_port()}
    base = base_image()
    env = dict(
        os.environ, COMPOSE_PROJECT_NAME=project, IMAGE_TAG=TAG, BASE_IMAGE=base, BIND_ADDR="127.0.0.1",
        BACKEND_PORT=str(ports["backend"]), UI_PORT=str(ports["ui"]), MODEL_DIR=str(model_dir), MODEL="/models",
    )
    v1 = compose == ["docker-compose"]
    if v1:  # build through docker-py with the classic builder: no buildx needed
        env.update(COMPOSE_DOCKER_CLI_BUILD="0", DOCKER_BUILDKIT="0")
    for name in ("WIKIGPT_API_KEY", "HF_TOKEN"):  # passed through by the compose file when set
        env.pop(name, None)
    old_images = {svc: image_id(f"wikigpt/{svc}:{TAG}") for svc in ("backend", "ui")}
    wheel, built = None, {}
    try:
        t0 = time.monotonic()
        wheel = feed_local_torch_wheel(base)
        # v2 builds services in parallel by itself; v1 needs to be asked
        build = sh(*compose, "build", *(["--parallel"] if v1 else []), env=env, timeout=1500, check=False)
        timings["build"] = time.monotonic() - t0
        assert build.returncode == 0, f"build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
        built = {svc: image_id(f"wikigpt/{svc}:{TAG}") for svc in old_images}

        t0 = time.monotonic()
        # v1 `up` waits for the backend's healthcheck before it starts the ui (depends_on).
        up = sh(*compose, "up", "-d", "--no-build", env=env, timeout=600, check=False)
        timings["up"] = time.monotonic() - t0
        if up.returncode != 0:
            logs = sh(*compose, "logs", "--no-color", "--tail", "80", env=env, check=False).stdout
            raise AssertionError(f"compose up failed:\n{up.stderr[-3000:]}\n{logs[-6000:]}")
        info = {"compose": compose, "env": env, "project": project, "ports": ports, "timings": timings}
        wait_healthy(info, ("backend", "ui"), timeout=180)
        timings["healthy"] = time.monotonic() - t0
        yield info
    finally:
        t0 = time.monotonic()
        # stop first to see how they stop: SIGTERM honoured, well inside the 20 s before SIGKILL
        sh(*compose, "stop", "--timeout", "20", env=env, timeout=120, check=False)
        timings["stop"] = time.monotonic() - t0
        exits = {svc: sh(DOCKER, "ps", "-a", "--format", "{{.Status}}", "--filter",
                         f"label=com.docker.compose.project={project}", "--filter",
                         f"label=com.docker.compose.service={svc}", check=False).stdout.strip()
                 for svc in ("backend", "ui")}
        down = sh(*compose, "down", "--volumes", "--remove-orphans", "--timeout", "20", env=env,
                  timeout=300, check=False)
        timings["down"] = time.monotonic() - t0
        # Keep one version as the next run's build cache, not a pile: drop the version this
        # build replaced, and ours if another run of this test retagged in the meantime.
        current = {svc: image_id(f"wikigpt/{svc}:{TAG}") for svc in old_images}
        stale = [old for svc, old in old_images.items() if old and old != current[svc]]
        stale += [mine for svc, mine in built.items() if mine and mine != current[svc]]
        if os.environ.get("WIKIGPT_DOCKER_KEEP_IMAGES", "1") == "0":
            stale += [x for x in current.values() if x]
        if stale:  # removing a GB of layers can take a minute on a busy disk
            sh(DOCKER, "rmi", *sorted(set(stale)), check=False, timeout=600)
        if wheel is not None:
            wheel.unlink(missing_ok=True)
        shutil.rmtree(model_dir, ignore_errors=True)
        print(f"\ncompose test timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        assert down.returncode == 0, down.stderr[-3000:]
        assert project_leftovers(project) == []
        if "healthy" in timings:  # the stack came up: it must also have stopped cleanly
            # the backend drains on SIGTERM and exits 0; Streamlit (the UI) may exit 143 = 128 +
            # SIGTERM; 137 would be the SIGKILL that follows a stop timeout
            assert timings["stop"] < 20 and exits["backend"].startswith("Exited (0)"), exits
            assert all(re.match(r"Exited \((0|143)\)", st) for st in exits.values()), exits


def container(stack, service: str) -> dict:
    """`docker inspect` of the service's container (found by Compose's labels: faster than `compose ps`)."""
    ids = sh(DOCKER, "ps", "-aq", "--filter", f"label=com.docker.compose.project={stack['project']}",
             "--filter", f"label=com.docker.compose.service={service}").stdout.split()
    assert len(ids) == 1, (service, ids)
    return json.loads(sh(DOCKER, "inspect", ids[0]).stdout)[0]


def wait_healthy(stack, services, timeout: float) -> None:
    """Bounded wait until every service's healthcheck passes; its logs when one does not."""
    deadline = time.monotonic() + timeout
    while True:
        states = {svc: container(stack, svc)["State"] for svc in services}
        if all(st.get("Health", {}).get("Status") == "healthy" for st in states.values()):
            return
        if time.monotonic() > deadline or any(st["Status"] in ("exited", "dead") for st in states.values()):
            logs = sh(*stack["compose"], "logs", "--no-color", "--tail", "60", env=stack["env"], check=False).stdout
            raise AssertionError(f"not healthy after {timeout} s: "
                                 f"{ {s: st.get('Health', {}).get('Status', st['Status']) for s, st in states.items()} }\n"
                                 f"{logs[-6000:]}")
        time.sleep(1)


def test_original_curl_call_on_the_published_backend_port(stack):
    require(shutil.which("curl"), "curl not installed (.ci/run installs it)")
    url = f"http://127.0.0.1:{stack['ports']['backend']}/predict"
    # The original's call exactly: no Content-Type (curl sends form encoding).
    out = sh("curl", "-sS", "--max-time", "60", "-X", "POST", url, "-d", json.dumps({"text": PROMPT},
             separators=(",", ":")))
    body = json.loads(out.stdout)
    assert body["predictions"].startswith(PROMPT) and len(body["predictions"]) > len(PROMPT), body


def test_containers_are_healthy_non_root_restarting_and_loopback_only(stack):
    for service, port in (("backend", 5000), ("ui", 8501)):
        info = container(stack, service)
        assert info["State"]["Health"]["Status"] == "healthy", (service, info["State"]["Health"]["Log"][-2:])
        assert info["Config"]["User"] == "wikigpt", service
        assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", service
        bindings = info["HostConfig"]["PortBindings"][f"{port}/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], (service, bindings)
    backend = container(stack, "backend")
    mounts = {m["Destination"]: m for m in backend["Mounts"]}
    assert mounts["/models"]["RW"] is False and mounts["/cache/huggingface"]["Type"] == "volume"
    # the non-root user can fill the Hub cache volume, and cannot touch the model
    probe = "touch /cache/huggingface/.w && rm /cache/huggingface/.w && ! touch /models/x 2>/dev/null && id -u"
    assert sh(DOCKER, "exec", backend["Id"], "sh", "-c", probe).stdout.strip() != "0"


def test_ui_image_has_no_torch_and_reaches_the_backend_by_service_name(stack):
    ui = container(stack, "ui")["Id"]
    probe = ("import importlib.util, json, urllib.request\n"
             "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('transformers') is None)\n"
             "print(json.load(urllib.request.urlopen('http://backend:5000/', timeout=10))['status'])\n")
    out = sh(DOCKER, "exec", ui, "python3", "-c", probe).stdout.split()
    assert out == ["True", "True", "ok"], out


def test_the_gateway_image_has_no_torch_and_relays_to_the_backend(stack):
    """docker/gateway.Dockerfile (the backend of docker-compose.vllm.yml): `serve --upstream` in a
    torch-free image, here on the stack's network in front of its backend."""
    image = f"wikigpt/gateway:{TAG}"
    build = sh(DOCKER, "build", "-q", "-f", "docker/gateway.Dockerfile", "--build-arg", f"BASE_IMAGE={base_image()}",
               "-t", image, ".", timeout=900, check=False, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, build.stderr[-3000:]
    network = next(iter(container(stack, "backend")["NetworkSettings"]["Networks"]))
    name = f"{stack['project']}-gateway"
    sh(DOCKER, "run", "-d", "--name", name, "--network", network, "-e", "WIKIGPT_UPSTREAM=http://backend:5000", image)
    try:
        probe = ("import importlib.util, json, time, urllib.request\n"
                 "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('transformers') is None)\n"
                 "for _ in range(120):\n"
                 "    try:\n"
                 "        urllib.request.urlopen('http://127.0.0.1:5000/ready', timeout=2); break\n"
                 "    except Exception: time.sleep(0.5)\n"
                 "r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:5000/predict', "
                 f"data=json.dumps({{'text': {PROMPT!r}}}).encode()), timeout=60)\n"
                 "print(json.load(r)['predictions'].startswith(" + repr(PROMPT) + "))\n")
        out = sh(DOCKER, "exec", name, "python3", "-c", probe, timeout=120).stdout.split()
        assert out == ["True", "True", "True"], out
        size = int(sh(DOCKER, "image", "inspect", "--format", "{{.Size}}", image).stdout)
        backend_size = int(sh(DOCKER, "image", "inspect", "--format", "{{.Size}}", f"wikigpt/backend:{TAG}").stdout)
        assert size < backend_size / 3, (size, backend_size)
    finally:
        sh(DOCKER, "rm", "-f", name, check=False)


def test_ui_page_shows_the_backend_ready(stack, tmp_path):
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{stack['ports']['ui']}/", timeout=60_000)
            sidebar = page.get_by_test_id("stSidebar")
            expect(sidebar.get_by_text("Backend ready")).to_be_visible(timeout=60_000)
            expect(sidebar.get_by_text("http://backend:5000")).to_be_visible()
            page.screenshot(path=str(tmp_path / "compose-ui.png"))
            assert "Traceback" not in page.content()
        finally:
            browser.close()


def test_compose_files_defaults_and_gpu_variant():
    """What `docker compose up` gives with nothing set, read back through Compose itself
    (no engine needed): loopback-only ports, the Hub model with its cache on a volume, the
    read-only model mount, ui after a healthy backend; the GPU file adds a CUDA build + GPUs."""
    compose = ["docker-compose"] if shutil.which("docker-compose") else None
    require(compose is not None, "`docker-compose` (v1) not installed; .ci/docker-engine.sh installs it")
    import yaml

    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}  # no .env leaks in
    cfg = yaml.safe_load(sh(*compose, "-f", "docker-compose.yml", "config", env=env).stdout)["services"]
    backend, ui = cfg["backend"], cfg["ui"]
    assert backend["ports"] == ["127.0.0.1:5000:5000/tcp"] and ui["ports"] == ["127.0.0.1:8501:8501/tcp"]
    assert backend["environment"]["WIKIGPT_MODEL"] == "neulab/distilgpt2-finetuned-wikitext103"
    assert backend["build"]["args"] == {"BASE_IMAGE": "python:3.12-slim",
                                        "TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}
    assert "hf-cache:/cache/huggingface:rw" in backend["volumes"]
    assert any(v.endswith(":/models:ro") for v in backend["volumes"])
    assert ui["depends_on"] == {"backend": {"condition": "service_healthy"}}
    assert ui["environment"]["WIKIGPT_API_URL"] == "http://backend:5000"
    assert {backend["restart"], ui["restart"]} == {"unless-stopped"}

    # pass-through: no value unless the caller's environment has one (then the container gets none)
    assert backend["environment"]["WIKIGPT_API_KEY"] is None and ui["environment"]["WIKIGPT_API_KEY"] is None
    keyed = yaml.safe_load(sh(*compose, "config", env=dict(env, WIKIGPT_API_KEY="k1")).stdout)["services"]
    assert keyed["backend"]["environment"]["WIKIGPT_API_KEY"] == keyed["ui"]["environment"]["WIKIGPT_API_KEY"] == "k1"

    gpu = yaml.safe_load(sh(*compose, "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config",
                            env=env).stdout)["services"]["backend"]
    assert gpu["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["image"] != backend["image"]  # a CUDA image never overwrites the CPU one
