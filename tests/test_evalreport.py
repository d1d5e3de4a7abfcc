"""evalreport.py: the eval_report.json summary that GET / sends and the UI shows."""

from __future__ import annotations

import json
import subprocess
import sys

from wikigpt.evalreport import EvalSummary, eval_summary, result_key, summarize


def test_summary_is_the_latest_measurement_flat_with_finite_numbers_only(tmp_path):
    latest = {"model": str(tmp_path), "data": "wikitext-2-raw", "split": "test", "n_tokens": 4096, "complete": False,
              "perplexity": 498.7, "word_perplexity": float("nan"), "bits_per_byte": 2.9, "window": 256,
              "stride": 128, "measured_at": "2026-12-02T10:00:00Z"}
    assert eval_summary(tmp_path) is None  # no report yet
    (tmp_path / "eval_report.json").write_text(json.dumps({"format": 1, "latest": latest, "results": [latest]}))
    summary = eval_summary(tmp_path)
    assert summary == {"perplexity": 498.7, "bits_per_byte": 2.9, "data": "wikitext-2-raw", "split": "test",
                       "n_tokens": 4096, "complete": False, "measured_at": "2026-12-02T10:00:00Z"}
    assert set(summary) <= set(EvalSummary.__annotations__) and json.dumps(summary, allow_nan=False)
    assert eval_summary("distilbert/distilgpt2") is None and summarize({"format": 1}) is None


def test_result_key_is_none_for_entries_without_conditions():
    assert result_key({"data": "d", "split": "test", "window": 8, "stride": 4, "complete": True}) == ("d", "test", 8, 4, None)
    assert result_key({"perplexity": 3.0}) is None


def test_client_and_schema_import_without_streamlit_or_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['streamlit'] = None\n"
            "import wikigpt.client, wikigpt.evalreport\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
