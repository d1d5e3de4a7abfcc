"""The soak benchmark's mix, shortened: a `wikigpt serve` process (and a gateway in front of a
real upstream) keeps its memory, file descriptors and threads flat across 1,500 mixed requests
after warm-up (benchmarks/soak_bench.py runs the same mix for 20,000 or more)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.common import ServerProcess
from benchmarks.soak_bench import run_mix, settle

ENV = {"WIKIGPT_COMPILE": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with room for the mix's longest prompt (60 words are ~250 of its tokens)."""
    from tests.conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "soak", n_positions=1024)


def soak(url: str, pid: int) -> tuple[dict, dict, list[str]]:
    """(stats after 1,000 warm-up requests, stats after 1,500 more, their errors). The warm-up
    is long enough to reach the plateau: the allocator's arenas and oneDNN's cached shapes grow
    for the first ~2,000 requests of this mix (+38 MB with the tiny model), then stay flat."""
    warm = asyncio.run(run_mix(url, 1000, 16, seed=0))
    assert not warm.errors, warm.errors[:5]
    base = settle(pid)
    tally = asyncio.run(run_mix(url, 1500, 16, seed=1))
    assert tally.requests == 1500 and set(tally.by_kind) >= {"hang_up", "n2", "logprobs_echo", "stream"}
    return base, settle(pid, base), tally.errors


def check(base: dict, end: dict, errors: list[str]) -> None:
    assert not errors, errors[:5]
    allowed = max(0.08 * base["rss_mb"], 40)
    assert end["rss_mb"] - base["rss_mb"] <= allowed, (base, end)
    assert end["fds"] <= base["fds"] and end["threads"] <= base["threads"], (base, end)


@pytest.mark.slow
def test_serve_keeps_memory_fds_and_threads_flat(model_dir, tmp_path):
    with ServerProcess(["--model", str(model_dir)], tmp_path / "serve.log", ENV) as srv:
        check(*soak(srv.url, srv.proc.pid))


@pytest.mark.slow
def test_the_gateway_keeps_memory_fds_and_threads_flat(model_dir, tmp_path):
    with ServerProcess(["--model", str(model_dir)], tmp_path / "up.log", ENV) as up, \
            ServerProcess(["--upstream", up.url], tmp_path / "gw.log", ENV) as gw:
        check(*soak(gw.url, gw.proc.pid))
