"""Where one sequence's decoding step spends its time, by operator (torch.profiler).

    .venv/bin/python benchmarks/step_profile.py                  # the engine's own choice (--quantization auto)
    .venv/bin/python benchmarks/step_profile.py --quantization none --tokens 100

Builds the serving engine on the DistilGPT2-shaped model (random weights: speed does not
depend on them), prefills one slot with 40 tokens, then profiles `--tokens` one-row decoding
steps on the engine's worker-thread settings (torch's threads, the forward the start-up
measurement chose). Prints a table of operators by total time per token, the step unprofiled
(best of 200), the memory-read bandwidth measured in the same run and the int8 or full-precision
weight-read limit it implies, so the products' share can be read against it
(docs/engine.md#where-the-time-goes-at-batch-1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import distilgpt2_shaped, memory_read_bandwidth  # noqa: E402

from wikigpt.engine.builder import build  # noqa: E402
from wikigpt.modeling import load_model  # noqa: E402
from wikigpt.settings import ModelSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--model", default=None, help="model directory (default: a DistilGPT2-shaped random model)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = args.model or str(distilgpt2_shaped(Path(tmp) / "distilgpt2-shaped"))
        lm = load_model(ModelSettings(model=path, device="cpu", dtype="float32"))
        eos = lm.tokenizer.eos_token_id
        built = build(lm, dtype=args.dtype, quantization=args.quantization, compile=True, slots=32,
                      context_length=lm.context_length, eos_id=eos, pad_id=eos)
        fw = built.forward
        slot = fw.allocate()
        fw.prefill([slot], [[eos] * 40])
        token = torch.tensor([eos])
        for _ in range(20):  # warm-up; the cache position grows by one a step as in serving
            fw.decode([slot], token)
        best = float("inf")
        for _ in range(200):
            t0 = time.perf_counter()
            fw.decode([slot], token)
            best = min(best, time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.tokens):
                fw.decode([slot], token)
        bandwidth = memory_read_bandwidth()
    weights = sum(p.numel() for n, p in lm.model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    bytes_per_weight = 1 if built.quantization == "int8" else built.dtype.itemsize
    limit = weights * bytes_per_weight / bandwidth
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {built.quantization} weights, "
          f"{str(built.dtype).removeprefix('torch.')}; {fw.describe()}")
    print("\n| operator | calls a token | ms a token | share |\n| --- | ---: | ---: | ---: |")
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"| `{e.key}` | {e.count / args.tokens:.0f} | {e.self_cpu_time_total / 1e3 / args.tokens:.3f} | "
              f"{e.self_cpu_time_total / total:.0%} |")
    print(f"\nstep unprofiled, best of 200: {best * 1e3:.2f} ms ({1 / best:.0f} tok/s in-process); "
          f"memory read {bandwidth / 1e9:.1f} GB/s: {weights * bytes_per_weight / 1e6:.0f} MB of weights a token "
          f"take {limit * 1e3:.2f} ms at that bandwidth, so the step runs at {limit / best:.0%} of the weight-read limit")


if __name__ == "__main__":
    main()
