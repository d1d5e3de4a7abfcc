"""What the gateway costs: `wikigpt serve --upstream` in front of vLLM against vLLM directly.

    .venv/bin/python benchmarks/gateway_bench.py --vllm-python .venv-vllm/bin/python
    .venv/bin/python benchmarks/gateway_bench.py --requests 32 --max-tokens 16 --rounds 1   # smoke run

It starts vLLM (its CPU build from `make vllm-venv`, or vLLM on GPUs when --vllm-python points
at such an install) on a random-weight DistilGPT2-shaped model (speed does not depend on the
weights) and a `wikigpt serve --upstream` in front of it, then sends the same non-streamed
completions (greedy, fixed length: EOS ignored, so every request makes exactly --max-tokens
tokens) from --clients concurrent clients to each, alternating direct and gateway rounds so a
busy machine slows both alike. It prints aggregate tokens/s, p50/p95 latency and the gateway's
share of vLLM's tokens/s (the issue's target: >= 95 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, distilgpt2_shaped, free_port, wait_ready  # noqa: E402

PROMPT = "The history of the Roman Empire covers the history of ancient Rome from"


def run_round(url: str, model: str, n: int, clients: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
            "top_k": 0, "repetition_penalty": 1.0, "ignore_eos": True}

    def one(_):
        t = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    return {"tokens": sum(r[1] for r in results), "wall": wall, "latencies": latencies}


def summary(rounds: list[dict]) -> dict:
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall"] for r in rounds)
    lat = sorted(x for r in rounds for x in r["latencies"])
    return {"requests": len(lat), "tok_s": tokens / wall, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("WIKIGPT_VLLM_PYTHON", str(REPO / ".venv-vllm/bin/python")))
    ap.add_argument("--model", help="model directory (default: a random DistilGPT2-shaped one)")
    ap.add_argument("--dtype", default="bfloat16", help="vLLM's --dtype")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per server, alternating")
    args = ap.parse_args()
    if not os.access(args.vllm_python, os.X_OK):
        sys.exit(f"no vLLM python at {args.vllm_python}: run `make vllm-venv` or pass --vllm-python")

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    model_dir = Path(args.model) if args.model else distilgpt2_shaped(work / "distilgpt2-shaped")
    vllm_url, gw_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_NO_USAGE_STATS": "1"}
    procs = []
    try:
        with open(work / "vllm.log", "w") as log:
            procs.append(subprocess.Popen(
                [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                 "--dtype", args.dtype, "--max-model-len", "1024", "--host", "127.0.0.1",
                 "--port", vllm_url.rsplit(":", 1)[1]],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        print(f"starting vLLM on {model_dir} (a minute or more: it compiles) ...", file=sys.stderr, flush=True)
        wait_ready(vllm_url, procs[0], work / "vllm.log", path="/v1/models")
        with open(work / "gateway.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "wikigpt.cli", "serve", "--upstream", vllm_url, "--port",
                 gw_url.rsplit(":", 1)[1], "--max-batch-size", str(max(32, args.clients)), "--log-level", "warning"],
                env={k: v for k, v in env.items() if not k.startswith("WIKIGPT_")}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT))
        wait_ready(gw_url, procs[1], work / "gateway.log", path="/v1/models")
        httpx.get(gw_url + "/ready", timeout=30).raise_for_status()
        model = httpx.get(vllm_url + "/v1/models").json()["data"][0]["id"]
        for url in (vllm_url, gw_url):  # warm-up: connections, vLLM's batch shapes
            run_round(url, model, min(args.clients, args.requests), args.clients, 4)
        results: dict[str, list[dict]] = {"vLLM direct": [], "gateway -> vLLM": []}
        for _ in range(args.rounds):
            for name, url in (("vLLM direct", vllm_url), ("gateway -> vLLM", gw_url)):
                results[name].append(run_round(url, model, args.requests, args.clients, args.max_tokens))
        rows = {name: summary(r) for name, r in results.items()}
        print(f"\n{args.clients} clients, {args.requests} requests x {args.rounds} rounds, {args.max_tokens} tokens each, "
              f"vLLM --dtype {args.dtype}\n")
        print("| server | requests | tokens/s | p50 latency | p95 latency | tokens/s vs direct |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        base = rows["vLLM direct"]["tok_s"]
        for name, r in rows.items():
            print(f"| {name} | {r['requests']} | {r['tok_s']:.0f} | {r['p50']:.2f} s | {r['p95']:.2f} s | "
                  f"{100 * r['tok_s'] / base:.1f} % |")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
