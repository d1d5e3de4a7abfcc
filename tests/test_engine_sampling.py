"""Per-row sampling: the right distribution, the right cuts, and seeds that ignore neighbours."""

from __future__ import annotations

import torch
from transformers import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from wikigpt.engine.sampling import RowSampling, apply_repetition_penalty, sample
from wikigpt.decoding import SamplingParams


def row(seed: int, **kw) -> RowSampling:
    gen = torch.Generator()
    gen.manual_seed(seed)
    params = SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, **kw})
    return RowSampling(params, gen)


def test_draws_follow_the_softmax():
    """4,000 draws from one row's generator: each token's frequency is within 4 standard
    errors of its softmax probability (fails for a biased draw, e.g. argmax of p + noise)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = logits.softmax(-1)[0]
    r = row(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample(logits.clone(), [r])] += 1
    freq = counts / 4000
    se = (p * (1 - p) / 4000).sqrt()
    assert bool(((freq - p).abs() <= 4 * se + 1e-3).all()), (freq, p)
    assert counts[4] == 0


def test_temperature_top_k_and_top_p_cut_where_they_should():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0]])
    seen = {int(sample(logits.clone(), [row(s, top_k=2)])) for s in range(200)}
    assert seen == {0, 1}
    # p = softmax: [0.47, 0.28, 0.17, 0.02, 0.01]; top_p 0.7 keeps the two whose mass reaches 0.7
    seen = {int(sample(logits.clone(), [row(s, top_p=0.7)])) for s in range(200)}
    assert seen == {0, 1}
    seen = {int(sample(logits.clone(), [row(s, temperature=1e-3)])) for s in range(50)}
    assert seen == {0}


def test_min_p_cuts_relative_to_the_most_likely_token():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0]])  # p = [0.47, 0.28, 0.17, 0.02, 0.01]
    seen = {int(sample(logits.clone(), [row(s, min_p=0.3)])) for s in range(300)}
    assert seen == {0, 1, 2}  # 0.3 x 0.47 = 0.14: the 0.17 stays, the 0.02 goes
    seen = {int(sample(logits.clone(), [row(s, min_p=0.5)])) for s in range(300)}
    assert seen == {0, 1}


def test_the_cuts_keep_what_transformers_warpers_keep():
    """Temperature, top-k, top-p and min-p together: every draw lies in what transformers' warper
    chain (in generate's order) leaves finite, and 1,000 draws reach every kept token of mass > 2 %
    (one such token goes unseen with probability 0.98 ** 1000 = 2e-9)."""
    torch.manual_seed(3)
    logits = torch.randn(4, 40) * 2
    for kw in ({"temperature": 0.7, "top_k": 12, "min_p": 0.1}, {"temperature": 1.3, "top_p": 0.8, "min_p": 0.05},
               {"temperature": 1.0, "top_k": 30, "top_p": 0.9, "min_p": 0.2}):
        chain = [TemperatureLogitsWarper(kw["temperature"]), TopKLogitsWarper(kw.get("top_k") or 40),
                 TopPLogitsWarper(kw.get("top_p", 1.0)), MinPLogitsWarper(kw["min_p"])]
        want = logits.clone()
        for warper in chain:
            want = warper(None, want)
        for i in range(len(logits)):
            kept = {int(t) for t in torch.isfinite(want[i]).nonzero()}
            likely = {t for t in kept if float(want[i].softmax(-1)[t]) > 0.02}
            seen = {int(sample(logits[i:i + 1].clone(), [row(s, **kw)])) for s in range(1000)}
            assert likely <= seen <= kept, (kw, i, seen, kept)


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    alone = [int(sample(logits[:1].clone(), [r])) for r in [row(7)] for _ in range(20)]
    mixed_rows = [row(7), row(1), row(2, temperature=0.0), row(3, top_k=5), row(4, top_p=0.5), row(5)]
    mixed = [int(sample(logits.clone(), mixed_rows)[0]) for _ in range(20)]
    assert alone == mixed
    assert len(set(alone)) > 1  # it really samples


def test_repetition_penalty_equals_transformers():
    torch.manual_seed(1)
    logits, seen = torch.randn(3, 50), torch.randint(0, 50, (3, 12))
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    got = logits.clone()
    apply_repetition_penalty(got, seen, torch.full((3,), 1.3))
    torch.testing.assert_close(got, want)


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    out = sample(logits.clone(), [row(0, temperature=0.0), row(1), row(2, temperature=0.0)])
    assert int(out[0]) == int(logits[0].argmax()) and int(out[2]) == int(logits[2].argmax())


def test_greedy_takes_torch_argmax_on_strided_rows_ties_and_nan():
    """The numpy argmax greedy rows take on a CPU picks what torch's does: on a view of a padded
    LM head's output, at ties (the first) and where a logit is NaN (it, as torch counts NaN largest)."""
    torch.manual_seed(3)
    padded = torch.randn(4, 130)
    logits = padded[:, :100]  # the engine slices the padded head's extra columns off
    logits[1, 7] = logits[1, 40] = 50.0
    logits[2, 60] = float("nan")
    want = logits.argmax(-1).tolist()
    assert want[1:3] == [7, 60]
    got = sample(logits, [row(i, temperature=0.0) for i in range(4)])  # the view itself: greedy edits nothing
    assert got.dtype == torch.long and got.tolist() == want
