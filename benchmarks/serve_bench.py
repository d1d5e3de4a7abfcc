"""Serving benchmark: `wikigpt serve` against the original project's design, llama.cpp's server and vLLM's CPU backend.

    make llama-server vllm-venv     # the peers, once (~15 min of compiling for llama.cpp)
    .venv/bin/python benchmarks/serve_bench.py --llama-cpp .llama.cpp --vllm-python .venv-vllm/bin/python
    .venv/bin/python benchmarks/serve_bench.py --concurrency 1,8 --max-tokens 16 --rounds 1   # smoke

All servers load the same model: a DistilGPT2-shaped GPT-2 with random weights (speed does not
depend on the weights), built from the shared config in a temp dir, or --model DIR. "seed-style"
is the original's design: one process, one thread, one greedy fp32 `generate` per request,
answering when the whole text is ready. wikigpt and vLLM get the same streaming client and the
same request body (greedy, EOS ignored, so token counts match). llama.cpp serves the same weights
converted by its own `convert_hf_to_gguf.py` to q8_0 (int8 in blocks of 32 with a float16
scale each), with as many slots as the top concurrency and one thread per core; vLLM runs in
its best dtype here (bf16 only where this CPU's bf16 matmuls measure 1.5x float32 or more). Servers run one at a time, each
level back to back, so the other servers' processes do not compete for the cores. The machine's
memory bandwidth and bf16/fp32 matmul peaks are measured in the same run; the report gives
wikigpt's batch-1 speed as a share of the weight-read limit (weight bytes per token / bandwidth)
of the dtype it serves, and its FLOP/s as a share of that dtype's matmul peak.
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

from common import distilgpt2_shaped, free_port, matmul_peak_flops, memory_read_bandwidth, wait_ready

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
async def drive(url: str, kind: str, concurrency: int, n_requests: int, max_tokens: int,
                model: str | None = None) -> dict:
    """`concurrency` clients sending `n_requests` in all. aiohttp, as vLLM's serving benchmark
    uses it: the client shares the two cores with the server under test, and httpx's
    pure-Python HTTP parsing took ~0.6 ms of CPU per streamed token there (aiohttp's C parser
    a fraction of that), CPU the servers' forward passes then waited for."""
    import aiohttp

    latencies, ttfts, tokens = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])

    async def client(c: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            if kind == "baseline":
                async with c.post(url + "/predict", json={"text": prompt}) as r:
                    r.raise_for_status()
                    tokens += (await r.json())["completion_tokens"]
                ttfts.append(time.perf_counter() - t0)  # nothing arrives before the whole text
            else:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "repetition_penalty": 1.0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                if model:
                    body["model"] = model
                first = None
                async with c.post(url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.content:  # one server-sent event line at a time
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event["choices"] and first is None:
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
                ttfts.append(first)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    # A connection per request (force_close): llama.cpp's server closes a connection after a
    # streamed answer without saying so, and a reused one then fails; every server gets the same.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                     connector=aiohttp.TCPConnector(limit=concurrency, force_close=True)) as c:
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


def weight_bytes_per_token(config: dict, bytes_per_weight: int) -> float:
    """Weights read once per decoding step: the blocks' matrices and the d x V output head."""
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    return (layers * 12 * d * d + d * vocab) * bytes_per_weight


def table(rows: list[dict], facts: dict, cfg: dict, prompt_len: float) -> str:
    out = ["| concurrency | server | requests | tokens/s | p50 latency | p50 TTFT | wikigpt / this | GFLOP/s |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ours = {r["concurrency"]: r for r in rows if r["server"] == "wikigpt"}
    for r in rows:
        w = ours.get(r["concurrency"])
        ratio = f"{w['tok_s'] / r['tok_s']:.2f}x" if w and r["server"] != "wikigpt" else ""
        ctx = prompt_len + r["tokens"] / r["requests"] / 2  # mean context over the generated tokens
        r["gflops"] = r["tok_s"] * flops_per_token(cfg, ctx) / 1e9
        out.append(f"| {r['concurrency']} | {r['server']} | {r['requests']} | {r['tok_s']:.0f} | "
                   f"{r['p50']:.2f} s | {r['ttft_p50']:.2f} s | {ratio} | {r['gflops']:.1f} |")
    int8 = facts.get("wikigpt_quantization") == "int8"
    dtype = "int8" if int8 else facts["wikigpt_dtype"]
    peak = facts["peak_bf16"] if dtype == "bfloat16" else facts["peak_fp32"]
    bytes_per_weight = 1 if int8 else 2 if dtype == "bfloat16" else 4
    limit = facts["bandwidth"] / weight_bytes_per_token(cfg, bytes_per_weight)
    out.append(f"\nmeasured in this run (the higher of two measurements, before and after the servers): "
               f"memory read {facts['bandwidth'] / 1e9:.1f} GB/s; matmul peak bf16 "
               f"{facts['peak_bf16'] / 1e9:,.0f} GFLOP/s, fp32 {facts['peak_fp32'] / 1e9:,.0f} GFLOP/s. "
               f"wikigpt serves {dtype} weights ({facts['wikigpt_kernels']})."
               + (f" vLLM serves {facts['vllm_dtype']}." if facts.get("vllm_dtype") else ""))
    if 1 in ours:
        per_token = weight_bytes_per_token(cfg, bytes_per_weight)
        out.append(f"batch 1: {ours[1]['tok_s']:.0f} tok/s = {ours[1]['tok_s'] / limit:.0%} of the {dtype} "
                   f"weight-read limit ({limit:.0f} tok/s = bandwidth / {per_token / 1e6:.0f} MB per token)")
        if "bandwidth_around" in ours[1]:
            near = ours[1]["bandwidth_around"] / per_token
            out.append(f"  against the bandwidth measured just before and after that level (the higher, "
                       f"{ours[1]['bandwidth_around'] / 1e9:.1f} GB/s): {ours[1]['tok_s'] / near:.0%} "
                       f"of {near:.0f} tok/s")
    top = max(ours) if ours else None
    if top and top > 1 and not int8:  # no int8 matmul peak is measured
        out.append(f"{top} clients: {ours[top]['gflops']:.0f} GFLOP/s = {ours[top]['gflops'] * 1e9 / peak:.0%} "
                   f"of the {dtype} matmul peak")
    return "\n".join(out)


def start_servers(kind: str, args, model_dir: Path, port: int, env: dict) -> subprocess.Popen:
    if kind == "seed-style":
        cmd = [sys.executable, __file__, "--baseline-server", "--model", str(model_dir), "--port", str(port),
               "--max-tokens", str(args.max_tokens)]
    elif kind == "wikigpt":
        cmd = [sys.executable, "-m", "wikigpt.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--log-level", "warning", *args.wikigpt_args.split()]
    elif kind == "llama.cpp":  # -c is the whole cache, shared by the slots: 1,024 tokens each
        slots = max(int(c) for c in args.concurrency.split(","))
        cmd = [str(Path(args.llama_cpp) / "build" / "bin" / "llama-server"), "-m", str(gguf_q8_0(args, model_dir)),
               "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(slots * 1024),
               "-t", str(os.cpu_count()), "--no-webui", *args.llama_args.split()]
    else:  # vLLM's OpenAI server, the recipe in the README (Scaling out)
        env = {**env, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1"}
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--dtype", args.vllm_dtype, "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(args.max_batch_size)]
    log = open(Path(tempfile.gettempdir()) / f"serve_bench-{kind}.log", "w")  # noqa: SIM115
    print(f"{kind}: logging to {log.name}", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def gguf_q8_0(args, model_dir: Path) -> Path:
    """The model's weights in llama.cpp's q8_0, converted by llama.cpp's own converter (next to
    the model directory, made once)."""
    out = model_dir.parent / f"{model_dir.name}-q8_0.gguf"
    if not out.exists():
        src = Path(args.llama_cpp) / "src" / "vendor" / "llama.cpp"
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "q8_0",
                        "--outfile", str(out)], env={**os.environ, "PYTHONPATH": str(src / "gguf-py")},
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def machine_ceilings() -> dict:
    print("measuring memory bandwidth and matmul peaks ...", file=sys.stderr, flush=True)
    return {"bandwidth": memory_read_bandwidth(), "peak_bf16": matmul_peak_flops("bfloat16"),
            "peak_fp32": matmul_peak_flops("float32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a random DistilGPT2-shaped model in a temp dir)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--vllm-python", help="python of a vllm-cpu virtualenv (`make vllm-venv`): adds vLLM")
    ap.add_argument("--llama-cpp", help="llama.cpp built by `make llama-server` (its LLAMA_DIR, .llama.cpp): "
                                        "adds llama.cpp's server on q8_0 weights")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, e.g. '--no-repack' (see docs/benchmarks.md)")
    ap.add_argument("--wikigpt-args", default="", help="extra `wikigpt serve` flags, e.g. '--quantization none'")
    ap.add_argument("--skip-seed-style", action="store_true", help="leave out the original's design (slow)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_server(args.model, args.port, args.max_tokens)

    import httpx

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = (([] if args.skip_seed_style else ["seed-style"]) + ["wikigpt"] + (["llama.cpp"] if args.llama_cpp else [])
             + (["vllm"] if args.vllm_python else []))
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-") as tmp:
        model_dir = Path(args.model) if args.model else distilgpt2_shaped(Path(tmp) / "distilgpt2-random")
        cfg = json.loads((model_dir / "config.json").read_text())
        facts = machine_ceilings()
        args.vllm_dtype = "bfloat16" if facts["peak_bf16"] >= 1.5 * facts["peak_fp32"] else "float32"
        if args.vllm_python:
            facts["vllm_dtype"] = args.vllm_dtype
        env = {k: v for k, v in os.environ.items() if k != "WIKIGPT_API_KEY"}
        rows = []
        for kind in kinds:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_servers(kind, args, model_dir, port, env)
            try:  # a server that fails to start is reported; the others' rows still print
                wait_ready(url, proc, path={"wikigpt": "/ready", "seed-style": "/"}.get(kind, "/health"), timeout=600)
                if kind == "wikigpt":
                    info = httpx.get(url + "/").json()
                    facts["wikigpt_dtype"], facts["wikigpt_kernels"] = info.get("dtype"), info.get("kernels")
                    facts["wikigpt_quantization"] = info.get("quantization")
                mode = "baseline" if kind == "seed-style" else "stream"
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"] if kind == "vllm" else None
                asyncio.run(drive(url, mode, 1, 2, args.max_tokens, model))  # warm-up
                for c in levels:
                    n = max(args.min_requests, c * args.rounds)
                    print(f"concurrency {c}: {kind}, {n} requests ...", file=sys.stderr, flush=True)
                    # batch 1 is set against the bandwidth of its own minute: on a shared host the
                    # reading moved between 25 and 63 GB/s within minutes (2-core EPYC, KVM)
                    own_bandwidth = kind == "wikigpt" and c == 1
                    before = memory_read_bandwidth() if own_bandwidth else 0.0
                    row = asyncio.run(drive(url, mode, c, n, args.max_tokens, model))
                    if own_bandwidth:
                        row["bandwidth_around"] = max(before, memory_read_bandwidth())
                    rows.append({**row, "server": kind})
            except SystemExit as exc:
                print(f"{kind} failed: {exc} (see its log)", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
        # The ceilings are measured again after the servers and the higher kept: a burst of load
        # elsewhere during one measurement would lower the ceiling and flatter the shares.
        for key, value in machine_ceilings().items():
            facts[key] = max(facts[key], value)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_len = statistics.mean(len(tok(p).input_ids) for p in PROMPTS)
    import platform

    import torch

    print(f"\nDistilGPT2-shaped model, {args.max_tokens} tokens per request (greedy, EOS ignored); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})\n")
    print(table(rows, facts, cfg, prompt_len))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **facts, "max_tokens": args.max_tokens}, indent=2))


if __name__ == "__main__":
    main()
