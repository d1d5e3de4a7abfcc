"""What int8 weights cost in quality: perplexity and next-token agreement, full precision vs int8.

    .venv/bin/python benchmarks/quant_bench.py                      # trains two models, ~40 min on 2 cores
    .venv/bin/python benchmarks/quant_bench.py --model runs/scratch-cpu/final --model DIR   # models you have

Random weights say nothing about quality, and no pretrained weights can be downloaded here, so
by default it first trains the best models a benchmark run allows with `wikigpt train`, on
WikiText-103's validation articles (../shared's wiki.valid.raw): the scratch-cpu preset's small
GPT-2 (4 x 256, its own 8k vocabulary) and a DistilGPT2-shaped model (6 x 768, GPT-2's
tokenizer), each from random weights for 400 steps of 2,048 tokens or --train-minutes.

Minutes of CPU training do not grow the activation outliers of real GPT-2 checkpoints (a few
channels of the products' inputs far larger than the rest), so each model is also measured with
outliers made by a function-preserving rescale (add_outliers, --outliers S): the same float32
logits, products' inputs with three channels S times larger.

Then, on the WikiText test articles (wiki.test.raw, which training never saw), for each model in
float32 and with serving's int8 weights (quantize.py) under each activation quantization, every
call forced to one product: wikigpt's kernel (int8 per block of 32 values) and FBGEMM's (one
scale per call; where its 8-bit activations are exact). Serving takes ours up to
backends().q8_rows rows and FBGEMM above, so evaluation windows alone would measure FBGEMM.
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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, TOKENIZER_DIR  # noqa: E402

from wikigpt.evaluate import evaluate_ids  # noqa: E402
from wikigpt.modeling import load_model  # noqa: E402
from wikigpt.quantize import Int8Linear, quantize_model  # noqa: E402
from wikigpt.settings import ModelSettings  # noqa: E402
from wikigpt.tables import markdown_table  # noqa: E402

DATA = SHARED / "data" / "wikitext-2-raw"
# GPT-2 small's outlier dimensions (138, 378, 447: the residual-stream channels that stay far
# larger than the rest in every layer), modulo n_embd for narrower models; each falls in a
# different block of 32 (blocks 4, 11, 13 of 24 at 768).
OUTLIER_CHANNELS = (138, 378, 447)
# x32 puts those channels' median |x| at ~20-35x all channels' median (peaks ~110x) in the
# products' inputs of models this script trains, inside the 20-60x of real GPT-2 checkpoints'
# outlier channels; and a power of two, so the rescale rounds nowhere in float32.
OUTLIER_SCALE = 32.0
# Calls of at most this many rows take our kernel: all of them, or none (FBGEMM).
BACKENDS = {"ours (per-32 block)": 1 << 30, "FBGEMM (per call)": 0}


def train(out: Path, minutes: float, *flags: str) -> Path:
    cmd = [sys.executable, "-m", "wikigpt.cli", "train", "--train-file", str(DATA / "wiki.valid.raw"),
           "--validation-split-percent", "5", "--output-dir", str(out), "--max-minutes", str(minutes),
           "--overwrite", "--no-progress", *flags]
    print("training:", " ".join(cmd[3:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "final"


def add_outliers(model: transformers.GPT2LMHeadModel, s: float, channels=OUTLIER_CHANNELS):
    """In place: every block's ln_1 and ln_2 gain and bias x s on `channels`, the matching input
    rows of the next product (attn.c_attn, mlp.c_fc; Conv1D weights are [in, out]) / s. The
    same function, (s * y_c) * (w_c / s) = y_c * w_c, with those input channels s times larger."""
    c = sorted({ch % model.config.n_embd for ch in channels})
    with torch.no_grad():
        for block in model.transformer.h:
            for ln, product in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                ln.weight[c] *= s
                ln.bias[c] *= s
                product.weight[c, :] /= s
    return model


def input_peak(model, ids: list[int]) -> float:
    """Median over the blocks' c_attn and c_fc of their input's max |x| / median |x|, one window."""
    ratios = []

    def record(module, args):
        x = args[0].abs()
        ratios.append(float(x.amax() / x.median()))

    hooks = [p.register_forward_pre_hook(record) for b in model.transformer.h for p in (b.attn.c_attn, b.mlp.c_fc)]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return statistics.median(ratios)


def use_backend(model, rows: int) -> bool:
    """Every int8 call of `model` takes our kernel where it has at most `rows` rows, FBGEMM
    above; False where the product this asks for is not kept here (Int8Weight keeps ours only
    where it runs, FBGEMM's packed copy only where its activations are exact)."""
    weights = [m.q for m in model.modules() if isinstance(m, Int8Linear)]
    if any(w.path is None if rows else w.packed is None for w in weights):
        return False
    for w in weights:
        w.q8_rows = rows
    return True


def top1(model, ids: list[int], window: int) -> torch.Tensor:
    """Argmax next token at every position, in windows of the model's context."""
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([ids[start:start + window]])).logits[0].argmax(-1)
                          for start in range(0, len(ids) - 1, window)])


def measure(path: str, text: str, max_tokens: int, stride: int | None, outliers: float) -> list[dict]:
    lm = load_model(ModelSettings(model=path, device="cpu", dtype="float32"))
    ids = [lm.tokenizer.eos_token_id, *lm.tokenizer(text[: max_tokens * 8]).input_ids][: max_tokens + 1]
    window = lm.context_length
    name = Path(path).parent.name or path
    variants = [(name, lm.model)]
    if outliers:
        variants.append((f"{name} + outliers x{outliers:g}", add_outliers(copy.deepcopy(lm.model), outliers)))
    with torch.inference_mode():
        reference = lm.model(torch.tensor([ids[:window]])).logits
        for _, model in variants[1:]:
            got = model(torch.tensor([ids[:window]])).logits
            assert (got - reference).abs().max() <= 1e-4 * reference.abs().max(), "the rescale changed the logits"
    rows = []
    for label, model in variants:
        full_lm = dataclasses.replace(lm, model=model)
        full, full_top1 = evaluate_ids(full_lm, ids, stride=stride, max_tokens=max_tokens), top1(model, ids, window)
        peak = input_peak(model, ids[:window])
        q = quantize_model(copy.deepcopy(model))
        for backend, q8_rows in BACKENDS.items():
            if not use_backend(q, q8_rows):
                print(f"{label}: {backend} does not run here", file=sys.stderr)
                continue
            int8 = evaluate_ids(dataclasses.replace(lm, model=q), ids, stride=stride, max_tokens=max_tokens)
            rows.append({"model": label, "params": lm.n_params, "tokens": full.n_tokens,
                         "peak": peak, "backend": backend,
                         "ppl_fp32": full.perplexity, "ppl_int8": int8.perplexity,
                         "change": int8.perplexity / full.perplexity - 1,
                         "agreement": float((top1(q, ids, window) == full_top1).float().mean())})
            print(f"{label}, {backend}: {rows[-1]['change']:+.3%}, {rows[-1]['agreement']:.2%}",
                  file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="a trained model directory (repeatable); default: train two")
    ap.add_argument("--train-minutes", type=float, default=12,
                    help="most training time per model (default 12); each stops at 400 steps otherwise")
    ap.add_argument("--keep", help="keep the trained models in this directory (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=20_000, help="test tokens scored per model (default 20,000)")
    ap.add_argument("--stride", type=int, default=None, help="default: 512 or half the window")
    ap.add_argument("--outliers", type=float, default=OUTLIER_SCALE,
                    help=f"also each model with outlier channels this many times larger "
                         f"(default {OUTLIER_SCALE:g}; 0: none)")
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
        rows = [r for m in models for r in measure(m, text, args.max_tokens, args.stride, args.outliers)]
    print(f"\nWikiText test articles (wiki.test.raw), first {args.max_tokens:,} tokens per model; torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads\n")
    print(markdown_table(
        ("model", "params", "tokens", "input max/median", "int8 activations", "perplexity fp32",
         "perplexity int8", "change", "top-1 agreement"),
        [(r["model"], f"{r['params'] / 1e6:.1f} M", f"{r['tokens']:,}", f"{r['peak']:.0f}x", r["backend"],
          f"{r['ppl_fp32']:.3f}", f"{r['ppl_int8']:.3f}", f"{r['change']:+.3%}", f"{r['agreement']:.2%}")
         for r in rows]))
    missed = [f"{r['model']} with {r['backend']}" for r in rows if abs(r["change"]) > 0.005 or r["agreement"] < 0.99]
    print("\ngoal (perplexity change within 0.5 %, agreement at least 99 %): "
          + (f"missed by {'; '.join(missed)}" if missed else "met by every model and backend"))


if __name__ == "__main__":
    main()
