"""Decoding quality: does the model's raw output loop or pour out blank lines?

The original project decoded greedily and its continuations degenerated into pages of
newlines. `wikigpt decoding-check` continues fixed prompts with three decodings and measures
the raw continuations (before our blank-line collapse, so the filter cannot hide anything):

- repeated n-gram share, rep-n = 1 - distinct n-grams / n-grams over the continuation's tokens
  (Welleck et al. 2019, "Neural text generation with unlikelihood training"): 0 for text that
  never repeats a 4-token phrase, near 1 for a loop;
- blank-line runs: places where 2+ blank lines follow each other (what the filter collapses);
- newline share: the fraction of generated tokens that are only whitespace holding a newline.

Prompts go through `generate` as one left-padded batch per decoding (sampled ones repeated
`samples` times in it), so the whole check is three batched generations.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from transformers import set_seed

from .decoding import SamplingParams
from .modeling import LoadedModel
from .settings import DecodingCheckSettings
from .tables import markdown_table
from .textfilter import BLANK_RUN



def rep_n(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def blank_line_runs(text: str) -> int:
    return len(BLANK_RUN.findall(text))


@torch.inference_mode()
def continue_batch(lm: LoadedModel, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    """Raw continuation token ids for each prompt (cut at EOS), one batched `generate` call."""
    tok = lm.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(lm.device)  # left padding (load_model)
    if params.seed is not None:
        set_seed(params.seed)
    out = lm.model.generate(**enc, generation_config=params.generation_config(tok))
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = tok.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@dataclass
class DecodingStats:
    decoding: str
    samples: int
    mean_tokens: float
    rep_n: float  # mean over samples
    blank_runs_per_sample: float
    samples_with_blank_runs: float  # fraction
    newline_token_share: float
    seconds: float


def measure(lm: LoadedModel, name: str, continuations: list[list[int]], n: int, seconds: float) -> DecodingStats:
    tok = lm.tokenizer
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in continuations]
    runs = [blank_line_runs(t) for t in texts]
    newline_ids = {i for ids in continuations for i in ids if "\n" in (piece := tok.decode([i])) and not piece.strip()}
    n_tokens = sum(len(ids) for ids in continuations)
    return DecodingStats(
        decoding=name,
        samples=len(continuations),
        mean_tokens=n_tokens / len(continuations),
        rep_n=sum(rep_n(ids, n) for ids in continuations) / len(continuations),
        blank_runs_per_sample=sum(runs) / len(runs),
        samples_with_blank_runs=sum(r > 0 for r in runs) / len(runs),
        newline_token_share=sum(i in newline_ids for ids in continuations for i in ids) / max(1, n_tokens),
        seconds=seconds,
    )


def decodings(max_new_tokens: int) -> list[tuple[str, SamplingParams]]:
    default = SamplingParams(max_new_tokens=max_new_tokens)
    greedy = default.model_copy(update={"temperature": 0.0})
    return [
        ("greedy (the original)", greedy.model_copy(update={"repetition_penalty": 1.0})),
        (greedy.describe(), greedy),
        (f"default ({default.describe()})", default),
    ]


def decoding_check(
    lm: LoadedModel, prompts: list[str], samples: int = 3, seed: int = 0, max_new_tokens: int = 128, n: int = 4
) -> tuple[list[DecodingStats], dict[str, list[str]]]:
    """Stats per decoding, and the raw continuations per decoding for a look.

    Each decoding is one batched `generate` call: greedy continues each prompt once (it is
    deterministic), sampling continues each prompt `samples` times in the same batch under one
    seed (three calls of 128 steps instead of one per seed).
    """
    stats, texts = [], {}
    for name, params in decodings(max_new_tokens):
        start = time.perf_counter()
        batch = list(prompts) if params.greedy else [p for p in prompts for _ in range(samples)]
        conts = continue_batch(lm, batch, params.model_copy(update={"seed": None if params.greedy else seed}))
        stats.append(measure(lm, name, conts, n, time.perf_counter() - start))
        texts[name] = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in conts]
    return stats, texts


def format_table(stats: list[DecodingStats], n: int = 4) -> str:
    head = ("decoding", "samples", "tokens", f"rep-{n}", "blank-line runs", "samples with runs", "newline tokens")
    rows = [
        (s.decoding, str(s.samples), f"{s.mean_tokens:.0f}", f"{s.rep_n:.1%}", f"{s.blank_runs_per_sample:.2f}",
         f"{s.samples_with_blank_runs:.0%}", f"{s.newline_token_share:.1%}")
        for s in stats
    ]
    return markdown_table(head, rows)


def run(s: DecodingCheckSettings) -> int:
    """`wikigpt decoding-check`."""
    from .modeling import load_model

    lm = load_model(s)
    stats, _ = decoding_check(lm, s.prompt, s.samples, s.seed, s.max_new_tokens, s.ngram)
    if s.json_output:
        print(json.dumps([asdict(x) for x in stats], indent=2))
    else:
        print(f"{lm.name}: {len(s.prompt)} prompts, {s.samples} samples each (seed {s.seed}), "
              f"{s.max_new_tokens} new tokens, raw continuations (before blank-line collapsing)\n")
        print(format_table(stats, s.ngram))
    return 0
