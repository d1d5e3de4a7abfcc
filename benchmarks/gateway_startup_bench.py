"""How light the gateway is: `wikigpt serve --upstream` from launch to ready, and its memory.

    .venv/bin/python benchmarks/gateway_startup_bench.py [--runs 5]

A gateway only relays (no torch, no model), so it should be ready in well under 2 s and hold
well under 150 MB. This starts a real upstream (`wikigpt serve` on a small random model; pass
--upstream URL to use another, e.g. vLLM), then launches the gateway --runs times, each time
timing launch -> first 200 from /ready (the upstream already answering), and reading its
resident memory (VmRSS) then and after 200 relayed completions.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, free_port  # noqa: E402
from soak_bench import process_stats, small_model  # noqa: E402


def one_gateway(upstream: str, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wikigpt.cli", "serve", "--upstream", upstream, "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the gateway exited; its log: {log}")
                try:
                    if c.get(url + "/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.01)
            ready = time.perf_counter() - t
            at_ready = process_stats(proc.pid)["rss_mb"]
            for i in range(200):
                c.post(url + "/v1/completions", json={"prompt": f"Data science {i}", "max_tokens": 8},
                       timeout=60).raise_for_status()
            after = process_stats(proc.pid)["rss_mb"]
    finally:
        proc.terminate()
        proc.wait(30)
    return {"ready_s": ready, "rss_ready": at_ready, "rss_after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--upstream", help="an OpenAI-compatible server to relay to (default: start one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-startup-"))
    if args.upstream:
        runs = [one_gateway(args.upstream, work / f"gw{i}.log") for i in range(args.runs)]
    else:
        with ServerProcess(["--model", str(small_model(work / "small"))], work / "upstream.log",
                           env={"WIKIGPT_COMPILE": "false"}) as up:
            runs = [one_gateway(up.url, work / f"gw{i}.log") for i in range(args.runs)]
    print("| run | launch -> ready | RSS at ready | RSS after 200 completions |")
    print("| ---: | ---: | ---: | ---: |")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['ready_s']:.2f} s | {r['rss_ready']:.0f} MB | {r['rss_after']:.0f} MB |")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedian: ready in {med['ready_s']:.2f} s (goal <= 2 s), {med['rss_ready']:.0f} MB at ready, "
          f"{med['rss_after']:.0f} MB after 200 completions (goal <= 150 MB)")


if __name__ == "__main__":
    main()
