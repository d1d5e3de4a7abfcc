"""Shared by the benchmarks: the DistilGPT2-shaped model and the machine's matmul peak.

No pretrained weights can be downloaded on our machines; speed does not depend on weight
values, so a randomly initialised model of the exact DistilGPT2 shape (82 M parameters,
config from ../shared/models/gpt2-tokenizer/config-distilgpt2.json) gives true speed figures.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WIKIGPT_SHARED", REPO.parent / "shared"))
TOKENIZER_DIR = SHARED / "models" / "gpt2-tokenizer"


def distilgpt2_shaped(out_dir: Path) -> Path:
    """Save a random-weight DistilGPT2-shaped model with the real GPT-2 tokenizer to out_dir."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

    from wikigpt.modeling import save_model

    config_file = TOKENIZER_DIR / "config-distilgpt2.json"
    if not config_file.is_file():
        sys.exit(f"needs {config_file} (set WIKIGPT_SHARED to the folder holding models/gpt2-tokenizer)")
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_json_file(str(config_file)))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    return save_model(model, tok, out_dir)


def matmul_peak_flops(dtype_name: str = "bfloat16", seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul: the best of single timed runs within `seconds`. 2048 wide
    (≈ 17 GFLOP, 8 ms with AMX); 512 wide where the dtype is emulated (bf16 on AVX2-only CPUs
    runs at well under 1 GFLOP/s and a 2048 matmul would take minutes)."""
    import torch

    dtype = getattr(torch, dtype_name)
    small = torch.randn(512, 512, dtype=dtype)
    t = time.perf_counter()
    small @ small
    n = 512 if time.perf_counter() - t > 0.02 else 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: oneDNN picks its kernel on the first call
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def memory_read_bandwidth(seconds: float = 1.0) -> float:
    """Bytes/s the CPU streams from memory: the best single sum over a 512 MB float32 tensor
    (much larger than any cache), i.e. the ceiling for reading weights once per token."""
    import torch

    x = torch.ones(128 * 1024 * 1024)
    x.sum()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, log: Path | None = None, path: str = "/ready", timeout: float = 900) -> None:
    """Poll `url + path` until it answers 200; exits naming the log if `proc` dies or time runs out."""
    import httpx

    where = f"; its log: {log}" if log else ""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}{where}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready after {timeout:.0f} s{where}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


class ServerProcess:
    """`wikigpt serve ARGS` as a child process on a free loopback port, ready on entering the
    `with` block; SIGTERM (then SIGKILL after `stop_timeout`) on leaving it."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, stop_timeout: float = 60) -> None:
        self.args, self.log, self.stop_timeout = args, log, stop_timeout
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        import subprocess

        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wikigpt.cli", "serve", *self.args, "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "warning"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, self.proc, self.log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
