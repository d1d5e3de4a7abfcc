"""Training throughput and quality at equal wall time: the original project's recipe vs ours.

    .venv/bin/python benchmarks/train_bench.py [--seconds 600] [--slices 4] [--eval-tokens 32768]

Same DistilGPT2-shaped model (random init, same seed), same text, same machine, same optimizer
(AdamW, lr 3e-4 after a short warm-up), each trained for the same wall time:
- original: one sample per WikiText *line* (headings and blank lines included), padded to the
  longest line in the batch, truncated at 512, batch 10, fp32, via transformers'
  DataCollatorForLanguageModeling (pad = EOS, pad positions masked out of the loss);
- ours: the packed token stream of data.py (articles separated by EOS), 512-token blocks,
  batch 4, the precision `wikigpt train` picks (bf16 autocast on CPUs with AMX, else fp32).
The two runs alternate in --slices slices so a busy machine slows both alike. Prints useful
(non-pad) tokens/s, the validation loss reached (packed validation blocks, the same for
both), MFU against the matmul peak measured here in the same dtype, and the ratios.
Data: WIKIGPT_SHARED's wikitext-2-raw (train: wiki.valid.raw, validation: wiki.test.raw).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import SHARED, distilgpt2_shaped, matmul_peak_flops

from wikigpt import data as wdata
from wikigpt.modeling import load_model
from wikigpt.settings import ModelSettings
from wikigpt.train import BlockSampler, resolve_precision


def flops_per_token(model, seq: int) -> float:
    """6 N (forward + backward matmuls) + attention 12 L d T (PaLM appendix B), N without the
    position embeddings; GPT-2's tied output layer is counted once, as the lm_head matmul."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - cfg.n_positions * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


class Run:
    def __init__(self, name, model, batches, autocast_dtype):
        self.name, self.model, self.batches = name, model.train(), batches
        self.dtype = autocast_dtype
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.steps = self.useful = self.seconds = self.computed = 0
        self.loss = float("nan")

    def train_for(self, seconds: float) -> None:
        # A step that starts before the deadline runs to its end: "train s" in the table is the
        # exact time each recipe got; use --seconds well above one step's time.
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            input_ids, labels, mask = next(self.batches)
            for g in self.opt.param_groups:  # 20-step linear warm-up, then constant
                g["lr"] = 3e-4 * min(1.0, (self.steps + 1) / 20)
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps += 1
            self.useful += int((labels != -100).sum())
            self.computed += input_ids.numel()
            self.loss = loss.item()
            self.seconds += time.perf_counter() - start


def original_batches(lines_ids: list[list[int]], tokenizer, seed: int):
    from transformers import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="pt")
    rng = np.random.default_rng(seed)
    while True:
        for i in range(0, len(lines_ids) - 9, 10):
            order = rng.permutation(len(lines_ids))[:10]
            batch = collate([{"input_ids": lines_ids[j][:512]} for j in order])
            ids, labels = batch["input_ids"], batch["labels"]
            if (labels != -100).sum() == 0:
                continue
            # Labels are not shifted by the collator; the model predicts token t+1 from <= t.
            yield ids[:, :-1], labels[:, 1:], batch["attention_mask"][:, :-1]


def packed_batches(tokens: np.ndarray, block: int, batch: int, seed: int):
    sampler, k = BlockSampler(wdata.num_blocks(tokens, block), seed), 0
    while True:
        rows = torch.from_numpy(wdata.get_blocks(tokens, [sampler.block(k + b) for b in range(batch)], block))
        k += batch
        yield rows[:, :-1], rows[:, 1:], None


@torch.no_grad()
def val_loss(model, tokens: np.ndarray, dtype, block: int = 512, limit: int = 32768) -> float:
    model.eval()
    n = min(wdata.num_blocks(tokens, block), max(1, limit // block))
    total = 0.0
    for i in range(0, n, 4):
        rows = torch.from_numpy(wdata.get_blocks(tokens, range(i, min(n, i + 4)), block))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=rows[:, :-1]).logits
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1)).item() * len(rows)
    model.train()
    return total / n


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600, help="training wall time per recipe")
    ap.add_argument("--slices", type=int, default=4, help="alternate the recipes in this many slices")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "wikitext-2-raw")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        log("building the DistilGPT2-shaped model")
        path = distilgpt2_shaped(Path(tmp) / "distilgpt2-shaped")
        lm = load_model(ModelSettings(model=str(path), device="cpu", dtype="float32"))
        tok = lm.tokenizer
        train_text = (args.data / "wiki.valid.raw").read_text(encoding="utf-8")
        # original: every line is a sample (run_clm's line_by_line); empty lines give empty samples
        lines = [ln for ln in train_text.splitlines(keepends=True)]
        line_ids = [ids for ids in tok(lines, add_special_tokens=False)["input_ids"] if ids]
        src = wdata.resolve_source(wdata.DataSettings(train_file=str(args.data / "wiki.valid.raw"),
                                                      test_file=str(args.data / "wiki.test.raw"),
                                                      validation_split_percent=0, cache_dir=str(Path(tmp) / "cache")))
        packed = wdata.load_split(src, "train", tok, Path(tmp) / "cache")
        val = wdata.load_split(src, "test", tok, Path(tmp) / "cache")
        ours_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision("auto", "cpu")]
        state = {k: v.clone() for k, v in lm.model.state_dict().items()}
        m2 = load_model(ModelSettings(model=str(path), device="cpu", dtype="float32")).model
        m2.load_state_dict(state)
        runs = [Run("original", lm.model, original_batches(line_ids, tok, 0), torch.float32),
                Run("ours", m2, packed_batches(packed, 512, 4, 0), ours_dtype)]
        log(f"{len(line_ids):,} non-empty lines, {len(packed):,} packed tokens; measuring the untrained loss")
        loss0 = val_loss(lm.model, val, torch.float32, limit=args.eval_tokens)
        for _ in range(args.slices):
            for r in runs:
                r.train_for(args.seconds / args.slices)
                log(f"{r.name}: {r.steps} steps, {r.useful:,} useful tokens, loss {r.loss:.3f}")
        peaks = {d: matmul_peak_flops(d, seconds=1.0) for d in {"float32", str(ours_dtype).split(".")[1]}}
        log("measuring matmul peaks and validation loss")
        results = []
        for r in runs:
            fpt = flops_per_token(r.model, 512)
            tps = r.useful / r.seconds
            peak = peaks[str(r.dtype).split(".")[1]]
            vl = val_loss(r.model, val, r.dtype, limit=args.eval_tokens)
            results.append((r, tps, vl, tps * fpt / peak, r.useful / max(1, r.computed)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seconds:.0f} s per recipe in "
          f"{args.slices} slices; DistilGPT2 shape, random init; validation = first {args.eval_tokens:,} tokens of "
          f"wiki.test.raw (loss before training {loss0:.3f}); matmul peak: "
          + ", ".join(f"{d} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items()))
    print("| recipe | dtype | train s | steps | useful tokens | useful tok/s | non-pad share | val loss | val ppl | MFU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r, tps, vl, mfu, share in results:
        print(f"| {r.name} | {str(r.dtype).split('.')[1]} | {r.seconds:,.0f} | {r.steps} | {r.useful:,} | {tps:,.0f} | {share:.0%} | "
              f"{vl:.3f} | {math.exp(vl):,.0f} | {mfu:.1%} |")
    (o, o_tps, o_vl, *_), (_, u_tps, u_vl, *_) = results
    print(f"ours / original: useful tokens/s x{u_tps / o_tps:.2f}, validation loss {u_vl - o_vl:+.3f} "
          f"(target: >= 3x and lower)")


if __name__ == "__main__":
    main()
