"""How the default repetition penalty was chosen: sampled decoding at several penalties.

    .venv/bin/python benchmarks/decoding_defaults.py --model runs/scratch-cpu/final

For each penalty, continues the fixed prompts of `wikigpt decoding-check` (3 samples each,
128 tokens, temperature 0.8 / top-p 0.95 / top-k 50, one seed) and prints the repeated 4-gram
share and blank-line runs of the raw continuations (lower is better: loops and newline
floods) and the model's own mean log-likelihood of the continuation per token without any
penalty (how far the penalty pushes text away from what the model finds likely; a big drop
means the penalty is forcing odd words). The greedy row is the original project's decoding.
"""

from __future__ import annotations

import argparse
import math

import torch

from wikigpt.modeling import load_model
from wikigpt.quality import continue_batch, measure
from wikigpt.decoding import SamplingParams
from wikigpt.settings import DEFAULT_PROMPTS, ModelSettings


@torch.inference_mode()
def mean_loglik(lm, prompts: list[str], conts: list[list[int]]) -> float:
    """Mean log p(token | prompt, previous tokens) over all continuation tokens, no penalty."""
    total, count = 0.0, 0
    for prompt, ids in zip(prompts, conts):
        if not ids:
            continue
        p = lm.tokenizer(prompt).input_ids
        x = torch.tensor([p + ids], device=lm.device)
        logp = torch.log_softmax(lm.model(x).logits[0, len(p) - 1 : -1].float(), -1)
        total += logp.gather(1, torch.tensor(ids, device=lm.device)[:, None]).sum().item()
        count += len(ids)
    return total / max(1, count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.05, 1.1, 1.2, 1.3])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = load_model(ModelSettings(model=args.model, device="cpu", dtype="float32"))
    prompts = [p for p in DEFAULT_PROMPTS for _ in range(args.samples)]
    runs = [("greedy, no penalty (original)", SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                                             repetition_penalty=1.0), list(DEFAULT_PROMPTS))]
    for rp in args.penalties:
        runs.append((f"sampled, penalty {rp}", SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=rp,
                                                               seed=args.seed), prompts))
    print(f"model {args.model}; {len(DEFAULT_PROMPTS)} prompts x {args.samples} samples, {args.max_new_tokens} tokens")
    print("| decoding | rep-4 | blank-line runs / sample | mean log-lik / token | per-token ppl |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, params, ps in runs:
        conts = continue_batch(lm, ps, params)
        st = measure(lm, name, conts, 4, 0.0)
        ll = mean_loglik(lm, ps, conts)
        print(f"| {name} | {st.rep_n:.1%} | {st.blank_runs_per_sample:.2f} | {ll:.3f} | {math.exp(-ll):.1f} |", flush=True)


if __name__ == "__main__":
    main()
