"""Evaluation speed and accuracy, fp32 vs bf16, on the WikiText-103 test text.

    .venv/bin/python benchmarks/eval_bench.py [--model DIR] [--max-tokens 4096] [--stride 512]

Runs `wikigpt evaluate`'s code (evaluate.evaluate_ids) on the first --max-tokens tokens of
wiki.test.raw in each dtype and prints forward tokens/s, perplexity, the bf16/fp32 speed ratio
and the relative perplexity difference, all from one run, so the ratios hold on a busy machine.
It also prints what `wikigpt evaluate --dtype auto` chooses on this CPU (modeling.auto_dtype).

Default model: a random DistilGPT2-shaped model (true speed; its perplexity is meaningless,
~vocabulary size). For the accuracy question pass a trained model: --model runs/scratch-cpu/final.
On CPUs without native bf16 (no AMX / AVX512-BF16) bf16 is ~50x slower: use small --max-tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from common import SHARED, distilgpt2_shaped

from wikigpt.evaluate import evaluate_ids
from wikigpt.modeling import auto_dtype, load_model
from wikigpt.settings import ModelSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: random DistilGPT2-shaped)")
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=None, help="default: the model's context")
    ap.add_argument("--stride", type=int, default=None, help="default: 512 or half the window")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    start = time.perf_counter()
    choice = str(auto_dtype("cpu", "evaluate")).removeprefix("torch.")
    probe_s = time.perf_counter() - start
    text = Path(args.text).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(distilgpt2_shaped(Path(tmp) / "distilgpt2-shaped"))
        results = {}
        for dtype in args.dtypes:
            lm = load_model(ModelSettings(model=path, device="cpu", dtype=dtype))
            # only the first ~8 characters per token are needed for --max-tokens tokens
            ids = [lm.tokenizer.eos_token_id, *lm.tokenizer(text[: args.max_tokens * 8]).input_ids]
            results[dtype] = evaluate_ids(lm, ids, window=args.window, stride=args.stride,
                                          batch_size=args.batch_size, max_tokens=args.max_tokens)
            del lm
    r0 = results[args.dtypes[0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {path}; "
          f"{r0.n_tokens:,} tokens scored, window {r0.window}, stride {r0.stride}, batch {args.batch_size}")
    print(f"--dtype auto on this CPU: {choice} (probe took {probe_s:.2f} s)\n")
    print("| dtype | forward tok/s | perplexity | speed vs first | perplexity vs first |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dtype, r in results.items():
        print(f"| {dtype} | {r.tokens_per_s:,.0f} | {r.perplexity:.4f} | {r.tokens_per_s / r0.tokens_per_s:.2f}x | "
              f"{(r.perplexity / r0.perplexity - 1) * 100:+.3f} % |")


if __name__ == "__main__":
    main()
