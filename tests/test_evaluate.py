import json
import math
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from wikigpt import cli
from wikigpt.data import split_articles
from wikigpt.evalreport import read_eval_report
from wikigpt.evaluate import EvalResult, count_text, evaluate_ids, plan_windows

from .conftest import CORPUS


def by_hand_nll(lm, ids: list[int], target: int, begin: int) -> float:
    """-ln p(ids[target] | ids[begin:target]) from one plain forward pass."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids[begin:target]])).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[ids[target]])


def corpus_ids(lm, repeat: int = 1) -> list[int]:
    return lm.tokenizer(CORPUS * repeat).input_ids


def test_text_in_one_window_equals_the_direct_computation(tiny_lm):
    ids = corpus_ids(tiny_lm)
    assert 50 < len(ids) <= tiny_lm.context_length
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.model(torch.tensor([ids])).logits[0].double(), -1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # position t predicts token t+1
    r = evaluate_ids(tiny_lm, ids, stride=64)
    assert r.n_windows == 1 and r.n_tokens == len(ids) - 1 and r.complete
    assert r.nll == pytest.approx(float(nll.sum()), rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)


def test_stride_scores_each_token_once_from_its_window_start(tiny_lm):
    ids = corpus_ids(tiny_lm, repeat=2)[:150]
    window, stride = 40, 16
    r = evaluate_ids(tiny_lm, ids, window=window, stride=stride, batch_size=3, keep_token_nll=True)
    assert math.isnan(r.token_nll[0]) and not torch.isnan(r.token_nll[1:]).any()
    assert r.n_tokens == len(ids) - 1
    for t in range(1, len(ids)):
        # token t >= window is scored by the first window reaching past it: begin k*stride with
        # k*stride + window > t, i.e. k = (t - window) // stride + 1; earlier tokens by window 0.
        begin = 0 if t < window else ((t - window) // stride + 1) * stride
        assert t - begin >= (1 if t < window else window - stride)
        assert float(r.token_nll[t]) == pytest.approx(by_hand_nll(tiny_lm, ids, t, begin), rel=1e-4, abs=1e-4)
    disjoint = evaluate_ids(tiny_lm, ids, window=window, stride=window)
    # stride 16 predicts each token from >= 24 tokens of context (mean 28); disjoint windows
    # (one token of overlap, so nothing goes unscored) from 1 to 39 (mean 19), at half the forwards
    assert disjoint.n_tokens == r.n_tokens and r.mean_context > disjoint.mean_context + 8
    assert r.forward_tokens > 2 * len(ids) > disjoint.forward_tokens


def test_batching_does_not_change_the_numbers(tiny_lm):
    ids = corpus_ids(tiny_lm, repeat=3)
    one = evaluate_ids(tiny_lm, ids, window=64, stride=32, batch_size=1)
    many = evaluate_ids(tiny_lm, ids, window=64, stride=32, batch_size=8)
    assert many.nll == pytest.approx(one.nll, rel=1e-5) and many.n_windows == one.n_windows


@pytest.mark.parametrize("n, window, stride", [(2, 8, 8), (100, 16, 5), (100, 16, 16), (17, 16, 1), (1000, 1024, 512)])
def test_windows_cover_every_target_exactly_once(n, window, stride):
    windows = plan_windows(n, window, stride)
    targets = [t for w in windows for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))
    assert all(w.end - w.begin <= window and w.begin < w.first_target for w in windows)


@pytest.mark.parametrize("n, window, stride, message", [
    (100, 16, 17, "--stride"), (100, 16, 0, "--stride"), (1, 16, 8, "at least 2"), (100, 1, 1, "--window"),
])
def test_bad_window_plans_are_errors(n, window, stride, message):
    from wikigpt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        plan_windows(n, window, stride)


def test_word_and_byte_normalisation(tiny_lm):
    tok = tiny_lm.tokenizer
    a, b = " = Café = \n The café opened in 1890 – twice .\n", " Data science is fun .\n"
    ids = [tok.eos_token_id, *tok(a).input_ids, tok.eos_token_id, *tok(b).input_ids, tok.eos_token_id]
    words, n_bytes = count_text(tok, ids)
    assert words == len(a.split()) + len(b.split()) == 16
    assert n_bytes == len((a + b).encode("utf-8")) == len(a + b) + 4  # é, é: 2 bytes each; –: 3 bytes
    r = evaluate_ids(tiny_lm, ids, stride=128)
    assert (r.n_words, r.n_bytes, r.n_tokens) == (words, n_bytes, len(ids) - 1)
    assert r.word_perplexity == pytest.approx(math.exp(r.nll / words))
    assert r.bits_per_byte == pytest.approx(r.nll / (n_bytes * math.log(2)))
    assert r.byte_perplexity == pytest.approx(2**r.bits_per_byte)
    d = r.to_dict()
    assert d["perplexity"] == r.perplexity and "token_nll" not in d and json.dumps(d)


def test_max_tokens_makes_a_partial_run(tiny_lm):
    ids = corpus_ids(tiny_lm, repeat=2)
    r = evaluate_ids(tiny_lm, ids, stride=128, max_tokens=50)
    assert not r.complete and r.n_tokens == 49
    assert (r.n_words, r.n_bytes) == count_text(tiny_lm.tokenizer, ids[:50])


def test_bfloat16_agrees_with_float32(tiny_model_dir):
    from wikigpt.modeling import load_model
    from wikigpt.settings import ModelSettings

    results = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(ModelSettings(model=str(tiny_model_dir), device="cpu", dtype=dtype))
        results[dtype] = evaluate_ids(lm, corpus_ids(lm, 2), window=128, stride=64)
    assert results["bfloat16"].dtype == "bfloat16"
    assert results["bfloat16"].perplexity == pytest.approx(results["float32"].perplexity, rel=0.01)


@pytest.mark.parametrize("speedup, dtype", [(6.0, "bfloat16"), (0.02, "float32")])  # an AMX Xeon; emulated bf16
def test_auto_dtype_on_cpu_follows_the_bf16_probe(monkeypatch, speedup, dtype):
    from wikigpt import modeling

    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: speedup)
    for use in ("serve", "evaluate", "train"):
        assert modeling.auto_dtype("cpu", use) == getattr(torch, dtype)
    assert modeling.auto_dtype("cpu", "generate") == torch.float32  # transformers' generate: float32


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(CORPUS.replace(" = Data science =", " \n = Data science = \n") + " \n = Rome = \n Rome is old .\n")
    return path


def run_cli(capsys, *args):
    rc = cli.main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_compares_models_and_writes_eval_report(tiny_model_dir, tmp_path, text_file, capsys):
    other = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, other)
    (other / "eval_report.json").unlink(missing_ok=True)
    rc, out, err = run_cli(capsys, "--model", tiny_model_dir, "--model", other, "--data", text_file.parent,
                           "--cache-dir", tmp_path / "cache", "--no-progress", "--stride", 128, "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["model"] for r in rows] == [str(tiny_model_dir), str(other)]
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"])  # same weights
    # EOS is prepended to the stream (EOS after each article), so every token of the text is scored
    articles = split_articles(text_file.read_text())
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert len(articles) == 2
    assert rows[0]["n_tokens"] == sum(len(tok(a).input_ids) + 1 for a in articles)
    report = read_eval_report(other)
    assert report["latest"]["perplexity"] == rows[1]["perplexity"] and report["latest"]["split"] == "test"
    assert [o["model"] for o in report["others"]] == [str(tiny_model_dir)]
    # a second run under other conditions is added; the same conditions replace the old entry
    for stride in (64, 128):
        assert run_cli(capsys, "--model", other, "--test-file", text_file, "--cache-dir", tmp_path / "cache",
                       "--no-progress", "--stride", stride)[0] == 0
    report = read_eval_report(other)
    assert sorted(r["stride"] for r in report["results"]) == [64, 128, 128]  # --data and --test-file differ
    assert report["latest"]["stride"] == 128 and report["others"]
    rc, out, _ = run_cli(capsys, "--model", other, "--test-file", text_file, "--cache-dir", tmp_path / "cache",
                         "--no-progress", "--max-tokens", 20, "--stride", 16, "--no-write-report")
    assert rc == 0 and "perplexity" in out and "(partial)" in out and "first 20 tokens" in out
    assert len(read_eval_report(other)["results"]) == 3


WRITER = """
import sys, time
from pathlib import Path
from wikigpt.evalreport import write_eval_report
from wikigpt.evaluate import EvalResult

folder, who, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(folder / f"ready-{who}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
for k in range(n):  # each write is under new conditions (stride), so none replaces another
    r = EvalResult(model=str(folder), data="d", split="test", n_tokens=9, n_words=3, n_bytes=12, nll=9.0,
                   window=8, stride=1 + who * n + k, n_windows=1, mean_context=1.0, complete=True,
                   dtype="float32", device="cpu", seconds=1.0, forward_tokens=9)
    write_eval_report(folder, r)
"""


def test_concurrent_report_writers_lose_no_result(tmp_path):
    """Processes adding results to one eval_report.json at once (as two `wikigpt evaluate` runs
    on one model folder do) keep every result: the read-modify-write holds a lock."""
    import os
    import subprocess
    import sys
    import time

    from .conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writers, n = 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(n)], env=env)
             for w in range(writers)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < writers and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()  # all start writing together
    assert [p.wait(timeout=300) for p in procs] == [0] * writers
    report = read_eval_report(tmp_path)
    assert sorted(r["stride"] for r in report["results"]) == list(range(1, writers * n + 1))
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(("ready-", "go"))} == {"eval_report.json"}


@pytest.mark.parametrize("args, message", [
    (["--stride", "0"], "--stride"),
    (["--stride", "300"], "--stride 300 is longer"),
    (["--window", "100", "--stride", "200"], "pass --stride 50"),
    (["--window", "999"], "--window 999 is longer than"),
    (["--model", "/no/such/model"], "could not load model '/no/such/model'"),
    (["--data", "/no/such/folder"], "--data /no/such/folder"),
    (["--split", "validation"], "no validation split"),
    (["--max-tokens", "1"], "--max-tokens"),
])
def test_cli_errors_exit_2(tiny_model_dir, text_file, tmp_path, capsys, args, message):
    base = ["--model", tiny_model_dir, "--test-file", text_file, "--cache-dir", tmp_path / "c", "--no-progress",
            "--stride", "64"]
    if args[0] == "--data":
        base = base[:2] + base[4:]
    rc, _, err = run_cli(capsys, *base, *args)
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_eval_result_handles_zero_words():
    r = EvalResult(model="m", data="d", split=None, n_tokens=3, n_words=0, n_bytes=0, nll=3.0, window=4, stride=4,
                   n_windows=1, mean_context=1.0, complete=True, dtype="float32", device="cpu", seconds=0.0,
                   forward_tokens=4)
    assert r.perplexity == pytest.approx(math.e) and math.isnan(r.word_perplexity) and math.isnan(r.tokens_per_s)


@pytest.mark.slow
def test_full_test_split_counts_match_the_raw_file(shared_tokenizer_dir, wikitext_dir, tmp_path):
    """The normalisation counts the raw WikiText exactly: GPT-2's BPE decodes back to the file."""
    from transformers import AutoTokenizer

    from wikigpt.evaluate import load_eval_stream
    from wikigpt.settings import EvalSettings

    tok = AutoTokenizer.from_pretrained(str(shared_tokenizer_dir))
    s = EvalSettings(data=str(wikitext_dir), split="test", cache_dir=str(tmp_path))
    ids, name = load_eval_stream(s, tok)
    raw = (wikitext_dir / "wiki.test.raw").read_text(encoding="utf-8")
    assert ids[0] == tok.eos_token_id and name == str(wikitext_dir)
    assert count_text(tok, ids.tolist()) == (len(raw.split()), len(raw.encode("utf-8")))


def test_cli_measures_what_int8_costs(tiny_model_dir, tmp_path, text_file, capsys):
    """--quantization both: a float32 and an int8 row per model, the int8 one computed with
    the products serving uses (a different number, close to the float32 one)."""
    model = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, model)
    (model / "eval_report.json").unlink(missing_ok=True)
    rc, out, err = run_cli(capsys, "--model", model, "--test-file", text_file, "--cache-dir", tmp_path / "cache",
                           "--no-progress", "--stride", 128, "--quantization", "both", "--json")
    assert rc == 0, err
    full, int8 = json.loads(out)
    assert (full["model"], full["dtype"], int8["model"], int8["dtype"]) == (str(model), "float32", str(model), "int8")
    assert int8["perplexity"] != full["perplexity"]
    assert int8["perplexity"] == pytest.approx(full["perplexity"], rel=0.02)
    assert read_eval_report(model)["latest"]["dtype"] == "float32"  # the model's own row stays full precision
