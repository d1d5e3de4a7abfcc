import json

import pytest

from wikigpt import cli
from wikigpt.quality import blank_line_runs, continue_batch, decoding_check, rep_n
from wikigpt.decoding import SamplingParams


def test_rep_n_counts_repeated_ngrams():
    assert rep_n([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 - 4 / 5)  # 5 4-grams, 1234 twice
    assert rep_n([7] * 10, 4) == pytest.approx(1 - 1 / 7)
    assert rep_n(list(range(20)), 4) == 0.0 and rep_n([1, 2], 4) == 0.0


@pytest.mark.parametrize("text, runs", [
    ("a\n\nb", 0), ("a\n\n\nb", 1), ("a\n \n\t\n\nb\n\n\n", 2), ("\n\n\n\n\n\n", 1), ("no newline", 0),
])
def test_blank_line_runs(text, runs):
    assert blank_line_runs(text) == runs


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_lm):
    prompts = ["Data Science is", "The history of the Roman Empire covers"]  # different lengths: left padding
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = continue_batch(tiny_lm, prompts, params)
    assert batched == [continue_batch(tiny_lm, [p], params)[0] for p in prompts]


def test_decoding_check_rows_and_reproducibility(tiny_lm):
    prompts = ["Data Science is", "Wikipedia is"]
    stats, samples = decoding_check(tiny_lm, prompts, samples=2, seed=0, max_new_tokens=16, n=4)
    assert [s.samples for s in stats] == [2, 2, 4]  # greedy runs once, sampling `samples` times
    assert stats[0].decoding.startswith("greedy") and stats[2].decoding.startswith("default")
    for s in stats:
        assert 0 <= s.rep_n <= 1 and 0 <= s.newline_token_share <= 1 and 0 < s.mean_tokens <= 16
    again, samples2 = decoding_check(tiny_lm, prompts, samples=2, seed=0, max_new_tokens=16, n=4)
    assert samples2 == samples  # seeded sampling and greedy are both reproducible


def test_cli_decoding_check_json(tiny_model_dir, capsys):
    rc = cli.main(["decoding-check", "--model", str(tiny_model_dir), "--prompt", "Data Science is",
                   "--samples", "1", "--seed", "3", "--max-new-tokens", "8", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["samples"] for r in rows] == [1, 1, 1] and all("rep_n" in r for r in rows)
    assert cli.main(["decoding-check", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
