"""Serving benchmark: `wikigpt serve` against a server written the way the original project served.

    .venv/bin/python benchmarks/serve_bench.py                  # full run (~5 min on 2 cores)
    .venv/bin/python benchmarks/serve_bench.py --concurrency 1,8 --max-tokens 16 --rounds 1   # smoke

Both servers load the same model: a DistilGPT2-shaped GPT-2 with random weights (speed does not
depend on the weights), built from the shared config in a temp dir, or --model DIR. The baseline
is the original's design: one process, one thread, one greedy `generate` per request, float32,
answering when the whole text is ready (stdlib http.server; Flask's server adds nothing but
overhead). Both get the same prompts at concurrency 1, 8 and 32, with the same greedy decoding
and a fixed output length (EOS ignored, so token counts match). Levels run back to back (baseline,
then engine) so a noisy neighbour hurts both alike; the ratios are the result, not the absolute
numbers. The bf16 matmul peak is measured in the same run and the engine's achieved FLOP/s is
reported as a share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from common import distilgpt2_shaped, matmul_peak_flops

PROMPTS = [
    "Data Science is", "The history of the Roman Empire", "Wikipedia is a free online encyclopedia",
    "The city of Paris", "In mathematics, a prime number", "The first World War began",
    "Robert Boulter is an English film and television actor", "The Tower Building of the Little Rock Arsenal",
]


# ---- the baseline server (runs in its own process) --------------------------------------------
def baseline_server(model_dir: str, port: int, max_tokens: int) -> None:
    import torch

    from wikigpt.modeling import load_model
    from wikigpt.settings import ModelSettings

    lm = load_model(ModelSettings(model=model_dir, device="cpu", dtype="float32"))
    tok, model = lm.tokenizer, lm.model

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, {"status": "ok"})

        def do_POST(self):
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
            enc = tok(text, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=tok.eos_token_id)
            self._send(200, {"predictions": tok.decode(out[0], skip_special_tokens=True),
                             "completion_tokens": int(out.shape[1] - enc.input_ids.shape[1])})

    # Backlog 128 as in Werkzeug's (Flask's) server; socketserver's default of 5 would reset
    # connections at concurrency 32 instead of letting them wait their turn.
    HTTPServer.request_queue_size = 128
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


# ---- load generation ----------------------------------------------------------------------------
async def drive(url: str, kind: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, ttfts, tokens = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            if kind == "baseline":
                r = await c.post(url + "/predict", json={"text": prompt})
                r.raise_for_status()
                ttfts.append(time.perf_counter() - t0)  # nothing arrives before the whole text
                tokens += r.json()["completion_tokens"]
            else:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "repetition_penalty": 1.0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                first = None
                async with c.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event["choices"] and first is None:
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
                ttfts.append(first)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"server": kind, "concurrency": concurrency, "requests": n_requests, "tokens": tokens,
            "seconds": wall, "tok_s": tokens / wall, "p50": statistics.median(latencies), "p95": q[18],
            "ttft_p50": statistics.median(ttfts)}


# ---- helpers ---------------------------------------------------------------------------------------
def flops_per_token(config: dict, context: float) -> float:
    """Forward FLOPs for one new token: 2 per weight multiply-add (12 d² per layer: QKV 3d²,
    projection d², MLP 8d²; plus the d x V output head) and 4 d per layer per token of context
    (scores and weighted values)."""
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    return 2 * (layers * 12 * d * d + d * vocab) + 4 * layers * d * context


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict], peak_bf16: float, peak_fp32: float, cfg: dict, prompt_len: float) -> str:
    out = ["| concurrency | server | requests | tokens/s | p50 latency | p95 latency | p50 TTFT | "
           "tokens/s ratio | p50 latency ratio | GFLOP/s | share of bf16 / fp32 matmul peak |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {r["concurrency"]: r for r in rows if r["server"] == "baseline"}
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['tok_s'] / b['tok_s']:.1f}x" if b and r["server"] != "baseline" else ""
        lat = f"{r['p50'] / b['p50']:.2f}x" if b and r["server"] != "baseline" else ""
        ctx = prompt_len + r["tokens"] / r["requests"] / 2  # mean context over the generated tokens
        flops = r["tok_s"] * flops_per_token(cfg, ctx)
        out.append(f"| {r['concurrency']} | {r['server']} | {r['requests']} | {r['tok_s']:.0f} | "
                   f"{r['p50']:.2f} s | {r['p95']:.2f} s | {r['ttft_p50']:.2f} s | {ratio} | {lat} | "
                   f"{flops / 1e9:.1f} | {flops / peak_bf16:.1%} / {flops / peak_fp32:.1%} |")
    out.append(f"\nmatmul peak measured in this run: bf16 {peak_bf16 / 1e9:,.1f} GFLOP/s, "
               f"fp32 {peak_fp32 / 1e9:,.1f} GFLOP/s (TTFT of the baseline = its latency: it answers "
               "only when the whole text is ready)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a random DistilGPT2-shaped model in a temp dir)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_server(args.model, args.port, args.max_tokens)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-") as tmp:
        model_dir = Path(args.model) if args.model else distilgpt2_shaped(Path(tmp) / "distilgpt2-random")
        cfg = json.loads((model_dir / "config.json").read_text())
        print("measuring matmul peaks ...", file=sys.stderr, flush=True)
        peak_bf16, peak_fp32 = matmul_peak_flops("bfloat16"), matmul_peak_flops("float32")
        bport, eport = free_port(), free_port()
        burl, eurl = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{eport}"
        env = {k: v for k, v in os.environ.items() if k != "WIKIGPT_API_KEY"}
        procs = [
            subprocess.Popen([sys.executable, __file__, "--baseline-server", "--model", str(model_dir),
                              "--port", str(bport), "--max-tokens", str(args.max_tokens)], env=env),
            subprocess.Popen([sys.executable, "-m", "wikigpt.cli", "serve", "--model", str(model_dir), "--port",
                              str(eport), "--max-batch-size", str(args.max_batch_size), "--log-level", "warning"],
                             env=env),
        ]
        try:
            wait_ready(burl, "/", procs[0])
            wait_ready(eurl, "/ready", procs[1])
            asyncio.run(drive(burl, "baseline", 1, 1, args.max_tokens))  # warm both up
            asyncio.run(drive(eurl, "engine", 1, 1, args.max_tokens))
            rows = []
            for c in levels:
                n = max(args.min_requests, c * args.rounds)
                for kind, url in (("baseline", burl), ("engine", eurl)):
                    print(f"concurrency {c}: {kind}, {n} requests ...", file=sys.stderr, flush=True)
                    rows.append(asyncio.run(drive(url, kind, c, n, args.max_tokens)))
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_len = statistics.mean(len(tok(p).input_ids) for p in PROMPTS)
    import platform

    import torch

    print(f"\nDistilGPT2-shaped model, {args.max_tokens} tokens per request (greedy, EOS ignored); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})\n")
    print(table(rows, peak_bf16, peak_fp32, cfg, prompt_len))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_bf16": peak_bf16, "peak_fp32": peak_fp32,
                                               "max_tokens": args.max_tokens}, indent=2))


if __name__ == "__main__":
    main()
