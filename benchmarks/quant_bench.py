"""What int8 weights cost in quality: perplexity and next-token agreement, full precision vs int8.

    .venv/bin/python benchmarks/quant_bench.py                      # trains two models, ~30 min on 2 cores
    .venv/bin/python benchmarks/quant_bench.py --model runs/scratch-cpu/final --model DIR   # models you have

Random weights say nothing about quality, and no pretrained weights can be downloaded here, so
by default it first trains the best models a benchmark run allows with `wikigpt train`, on
WikiText-103's validation articles (../shared's wiki.valid.raw): the scratch-cpu preset's small
GPT-2 (4 x 256, its own 8k vocabulary) and a DistilGPT2-shaped model (6 x 768, GPT-2's
tokenizer), each from random weights for 400 steps of 2,048 tokens or --train-minutes. Then, on the WikiText test articles
(wiki.test.raw, which training never saw), for each model in float32 and with the int8 weights
serving uses (quantize.py):
- perplexity with `wikigpt evaluate`'s sliding window (evaluate.evaluate_ids), first
  --max-tokens tokens of the split;
- top-1 agreement: the share of positions where both pick the same next token (argmax), over
  the same tokens in windows of the model's context.
The goal (issue: int8 weights): perplexity changes by at most 0.5 %, agreement at least 99 %.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from common import SHARED, TOKENIZER_DIR

from wikigpt.evaluate import evaluate_ids
from wikigpt.modeling import load_model
from wikigpt.quantize import quantize_model
from wikigpt.settings import ModelSettings
from wikigpt.tables import markdown_table

DATA = SHARED / "data" / "wikitext-2-raw"


def train(out: Path, minutes: float, *flags: str) -> Path:
    cmd = [sys.executable, "-m", "wikigpt.cli", "train", "--train-file", str(DATA / "wiki.valid.raw"),
           "--validation-split-percent", "5", "--output-dir", str(out), "--max-minutes", str(minutes),
           "--overwrite", "--no-progress", *flags]
    print("training:", " ".join(cmd[3:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "final"


def agreement(model_a, model_b, ids: list[int], window: int) -> float:
    """Share of positions whose argmax next token is the same under both models."""
    same = total = 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            a, b = model_a(chunk).logits.argmax(-1), model_b(chunk).logits.argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
    return same / total


def measure(path: str, text: str, max_tokens: int, stride: int | None) -> dict:
    lm = load_model(ModelSettings(model=path, device="cpu", dtype="float32"))
    ids = [lm.tokenizer.eos_token_id, *lm.tokenizer(text[: max_tokens * 8]).input_ids][: max_tokens + 1]
    full = evaluate_ids(lm, ids, stride=stride, max_tokens=max_tokens)
    q = dataclasses.replace(lm, model=quantize_model(copy.deepcopy(lm.model)))
    int8 = evaluate_ids(q, ids, stride=stride, max_tokens=max_tokens)
    agree = agreement(lm.model, q.model, ids, lm.context_length)
    return {"model": path, "params": lm.n_params, "tokens": full.n_tokens, "ppl_fp32": full.perplexity,
            "ppl_int8": int8.perplexity, "change": int8.perplexity / full.perplexity - 1, "agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="a trained model directory (repeatable); default: train two")
    ap.add_argument("--train-minutes", type=float, default=12,
                    help="most training time per model (default 12); each stops at 400 steps otherwise")
    ap.add_argument("--keep", help="keep the trained models in this directory (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=20_000, help="test tokens scored per model (default 20,000)")
    ap.add_argument("--stride", type=int, default=None, help="default: 512 or half the window")
    args = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    text = (DATA / "wiki.test.raw").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="wikigpt-quant-") as tmp:
        work = Path(args.keep or tmp)
        models = args.model or [
            str(train(work / "scratch-cpu", args.train_minutes, "--preset", "scratch-cpu")),
            str(train(work / "distilgpt2-shaped", args.train_minutes, "--init", "scratch", "--architecture",
                      str(TOKENIZER_DIR / "config-distilgpt2.json"), "--tokenizer", str(TOKENIZER_DIR),
                      "--block-size", "256", "--batch-size", "8", "--tokens-per-step", "2048",
                      "--learning-rate", "6e-4", "--warmup-steps", "30", "--max-steps", "400",
                      "--eval-interval", "400", "--save-interval", "100")),
        ]
        rows = [measure(m, text, args.max_tokens, args.stride) for m in models]
    print(f"\nWikiText test articles (wiki.test.raw), first {args.max_tokens:,} tokens per model; torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads\n")
    print(markdown_table(
        ("model", "params", "tokens", "perplexity fp32", "perplexity int8", "change", "top-1 agreement"),
        [(Path(r["model"]).parent.name or r["model"], f"{r['params'] / 1e6:.1f} M", f"{r['tokens']:,}",
          f"{r['ppl_fp32']:.3f}", f"{r['ppl_int8']:.3f}", f"{r['change']:+.3%}", f"{r['agreement']:.2%}")
         for r in rows]))
    missed = [Path(r["model"]).parent.name for r in rows if abs(r["change"]) > 0.005 or r["agreement"] < 0.99]
    print("\ngoal (perplexity change within 0.5 %, agreement at least 99 %): "
          + (f"missed by {', '.join(missed)}" if missed else "met by every model"))


if __name__ == "__main__":
    main()
