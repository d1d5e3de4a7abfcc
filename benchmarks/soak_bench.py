"""Soak: does a long-running `wikigpt serve` keep its memory, file descriptors and threads flat?

    .venv/bin/python benchmarks/soak_bench.py                         # 20,000 mixed requests
    .venv/bin/python benchmarks/soak_bench.py --minutes 30            # or for a time
    .venv/bin/python benchmarks/soak_bench.py --gateway               # `serve --upstream` in front of a wikigpt serve
    .venv/bin/python benchmarks/soak_bench.py --requests 3000 --round 500   # a short look

It starts `wikigpt serve` as a subprocess (default model: a small random GPT-2 with the real
GPT-2 tokenizer, so per-request objects are realistic and the run is not bound by matmuls; pass
--model for any other), warms it up, then sends the operator's mix from --clients concurrent
clients: prompts of 1-60 words (a third of them an earlier prompt of the same client again, or
it plus more words: prefix-cache hits and evictions), 1-48 tokens, greedy and sampled; /predict, non-streamed and
streamed completions, `n: 2`, `logprobs` + `echo`, stop strings, and streams whose client hangs
up after the first event. After each round it prints the server's RSS, open file descriptors
and threads (from /proc), requests per second and errors; the last line compares the end with
the state after warm-up. tests/test_soak.py runs a short version of the same mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TOKENIZER_DIR, ServerProcess  # noqa: E402

WORDS = ("the history of science data model wiki encyclopedia Roman empire river city music band album "
         "season game team war battle church king song film station road bridge island species").split()
KINDS = ("predict", "complete", "complete_sampled", "stream", "n2", "logprobs_echo", "stop", "hang_up")


@dataclass
class Tally:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)


def body_for(kind: str, rng: random.Random, earlier: list[str] | None = None) -> tuple[str, dict]:
    """One request of the mix: (path, JSON body). With `earlier` (prompts sent before, at most
    64 kept), a third of the prompts are an earlier one again, or it plus a few words (the next
    turn of a conversation): the prefix cache's hits, misses and evictions all happen."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    if earlier is not None:
        if earlier and rng.random() < 1 / 3:
            prompt = rng.choice(earlier) + ("" if rng.random() < 0.5 else " " + prompt[:rng.randint(0, 60)])
            prompt = " ".join(prompt.split()[:90])  # a bounded conversation: ~380 tokens at most
        earlier.append(prompt)
        del earlier[:-64]
    tokens = rng.randint(1, 48)
    if kind == "predict":
        return "/predict", {"text": prompt, "max_new_tokens": tokens}
    body: dict = {"prompt": prompt, "max_tokens": tokens}
    if kind == "complete":
        body.update(temperature=0.0)
    elif kind in ("stream", "hang_up"):
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "n2":
        body.update(n=2, seed=rng.randint(0, 1000))
    elif kind == "logprobs_echo":
        body.update(logprobs=rng.randint(0, 5), echo=True, temperature=0.0)
    elif kind == "stop":
        body.update(stop=[rng.choice(WORDS), "\n"])
    return "/v1/completions", body


async def one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random, tally: Tally,
              earlier: list[str] | None = None) -> None:
    path, body = body_for(kind, rng, earlier)
    try:
        async with session.post(url + path, data=json.dumps(body)) as r:
            if r.status != 200:
                tally.errors.append(f"{kind}: HTTP {r.status} {(await r.text())[:200]}")
            elif kind == "hang_up":
                await r.content.readline()  # the first event's line, then leave: the connection closes
                r.close()
            elif body.get("stream"):
                text = await r.text()
                if not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                    tally.errors.append(f"{kind}: stream ended badly: {text[-200:]!r}")
            else:
                answer = await r.json()
                if "predictions" not in answer and not answer.get("choices"):
                    tally.errors.append(f"{kind}: no answer: {str(answer)[:200]}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    tally.requests += 1
    tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1


async def run_mix(url: str, requests: int, clients: int, seed: int, deadline: float | None = None) -> Tally:
    """`requests` requests of the mix from `clients` concurrent clients (or fewer, if the monotonic
    `deadline` passes first); each client keeps one keep-alive connection pool of its own."""
    tally, counter = Tally(), iter(range(requests))
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(i: int) -> None:
        rng, earlier = random.Random(seed * 1000 + i), []  # each client's own conversations
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as session:
            for _ in counter:
                if deadline is not None and time.monotonic() > deadline:
                    return
                await one(session, url, rng.choice(KINDS), rng, tally, earlier)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


def process_stats(pid: int) -> dict:
    """RSS (MB), open file descriptors and threads of a process, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def settle(pid: int, baseline: dict | None = None, seconds: float = 10.0) -> dict:
    """The process's stats once the last round is over on its side too (hung-up streams'
    connections closed): a second after the round, or, given the `baseline`, as soon as its
    fds and threads are back to the baseline's counts (at most `seconds`)."""
    time.sleep(1.0)
    deadline = time.monotonic() + seconds
    stats = process_stats(pid)
    while baseline and any(stats[k] > baseline[k] for k in ("fds", "threads")) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = process_stats(pid)
    return stats


def small_model(out_dir: Path) -> Path:
    """A 4-layer, 256-wide random GPT-2 with the real GPT-2 tokenizer (50,257 tokens)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

    from wikigpt.modeling import save_model

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    set_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=1024, vocab_size=len(tok)))
    return save_model(model, tok, out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a small random GPT-2, built once)")
    ap.add_argument("--requests", type=int, default=20_000, help="mixed requests after warm-up")
    ap.add_argument("--minutes", type=float, help="stop after this long instead (whichever comes first)")
    ap.add_argument("--warmup", type=int, default=1_000, help="requests before the baseline reading")
    ap.add_argument("--round", type=int, default=2_000, help="requests between readings")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--gateway", action="store_true", help="soak `serve --upstream` in front of a wikigpt serve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    model = args.model or str(small_model(work / "small"))
    with ExitStack() as stack:
        target = stack.enter_context(ServerProcess(["--model", model], work / "server.log"))
        if args.gateway:
            target = stack.enter_context(ServerProcess(["--upstream", target.url], work / "gateway.log"))
        soak(target, args)
    print(f"logs: {work}")


def soak(server: ServerProcess, args: argparse.Namespace) -> None:
    pid = server.proc.pid
    started = time.monotonic()
    deadline = started + 60 * args.minutes if args.minutes else None
    import httpx

    info = httpx.get(server.url + "/").json()
    print(f"serving {info.get('dtype')}, quantization {info.get('quantization')} ({info.get('kernels')})")
    print(f"warm-up: {args.warmup} requests", flush=True)
    asyncio.run(run_mix(server.url, args.warmup, args.clients, args.seed))
    base = settle(pid)
    print("| round | requests | req/s | errors | RSS MB | RSS vs warm-up | fds | threads |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| 0 | 0 | | | {base['rss_mb']:.0f} | | {base['fds']} | {base['threads']} |", flush=True)
    done, errors, round_no = 0, [], 0
    while done < args.requests and (deadline is None or time.monotonic() < deadline):
        round_no += 1
        t = time.perf_counter()
        tally = asyncio.run(run_mix(server.url, min(args.round, args.requests - done), args.clients,
                                    args.seed + round_no, deadline))
        wall = time.perf_counter() - t
        done += tally.requests
        errors += tally.errors
        s = settle(pid, base)
        growth = 100 * (s["rss_mb"] / base["rss_mb"] - 1)
        print(f"| {round_no} | {done} | {tally.requests / wall:.1f} | {len(tally.errors)} | {s['rss_mb']:.0f} | "
              f"{growth:+.1f} % | {s['fds']} | {s['threads']} |", flush=True)
    print(f"\n{done} requests after {args.warmup} of warm-up, {len(errors)} errors, "
          f"{(time.monotonic() - started) / 60:.1f} min; RSS {base['rss_mb']:.0f} -> {s['rss_mb']:.0f} MB "
          f"({growth:+.1f} %), fds {base['fds']} -> {s['fds']}, threads {base['threads']} -> {s['threads']}")
    for e in errors[:10]:
        print("  error:", e)


if __name__ == "__main__":
    main()
