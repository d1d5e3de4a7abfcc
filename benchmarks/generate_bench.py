"""Decoding speed of plain `generate` on the DistilGPT2-shaped model: fp32 vs bf16 by batch size.

    .venv/bin/python benchmarks/generate_bench.py [--batch-sizes 1 8 32] [--new-tokens 64]

Prints tokens/s for each (dtype, batch) and the bf16/fp32 ratio, all measured in one run,
so the ratios hold even on a busy machine. This is the measurement behind
`modeling.auto_dtype`'s choice of float32 on CPU for single-prompt generation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import distilgpt2_shaped

from wikigpt.modeling import load_model
from wikigpt.settings import ModelSettings

PROMPT = "The history of the Roman Empire"


def tokens_per_second(lm, batch: int, new_tokens: int, repeats: int) -> float:
    enc = lm.tokenizer([PROMPT] * batch, return_tensors="pt")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=lm.tokenizer.eos_token_id)
    with torch.inference_mode():
        lm.model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=lm.tokenizer.eos_token_id)  # warm-up
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            lm.model.generate(**enc, **kwargs)
            best = max(best, batch * new_tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per cell")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = distilgpt2_shaped(Path(tmp) / "distilgpt2-shaped")
        rows = {}
        for dtype in ("float32", "bfloat16"):
            lm = load_model(ModelSettings(model=str(path), device="cpu", dtype=dtype))
            for b in args.batch_sizes:
                rows[(dtype, b)] = tokens_per_second(lm, b, args.new_tokens, args.repeats)
            del lm
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, greedy")
    print("| batch | fp32 tok/s | bf16 tok/s | bf16 / fp32 |")
    print("| ---: | ---: | ---: | ---: |")
    for b in args.batch_sizes:
        f, h = rows[("float32", b)], rows[("bfloat16", b)]
        print(f"| {b} | {f:,.0f} | {h:,.0f} | {h / f:.2f} |")


if __name__ == "__main__":
    main()
