"""lm-eval-harness's `local-completions` model against our API, end to end: the real `lm_eval`
command on two tiny local tasks (tests/lm_eval_tasks: a multiple-choice loglikelihood task and a
rolling-loglikelihood one, their data a JSONL file, no Hub), served by a real uvicorn server on
the fp32 tiny model. Every loglikelihood lm-eval logs equals a direct forward pass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from tests.test_api import LiveServer

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"
LM_EVAL = Path(sys.executable).with_name("lm_eval")

@pytest.fixture(scope="module")
def server(tiny_lm):
    srv = LiveServer(tiny_lm)
    yield srv
    srv.close()


def loglikelihood(lm, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    with torch.inference_mode():
        logp = lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    rows = logp[len(context) - 1:-1]
    return float(rows.gather(1, torch.tensor(continuation)[:, None]).sum())


def test_lm_eval_local_completions_loglikelihood_and_rolling(server, tiny_lm, tiny_model_dir, tmp_path):
    require(LM_EVAL.exists(), f"{LM_EVAL} not found: lm-eval is in the dev extra (pip install -e '.[dev]')")
    out = tmp_path / "results"
    args = [str(LM_EVAL), "--model", "local-completions", "--model_args",
            f"base_url={server.url}/v1/completions,model={tiny_lm.name},tokenizer={tiny_model_dir},"
            "tokenizer_backend=huggingface,max_length=256,num_concurrent=1,max_retries=1",
            "--tasks", "wikigpt_tiny_choice,wikigpt_tiny_rolling", "--include_path", str(TASKS),
            "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    tok = tiny_lm.tokenizer
    eos = tok.eos_token_id  # lm-eval's prefix token for rolling windows (no BOS in GPT-2)
    samples = {p.name.split("_2")[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in out.rglob("samples_*.jsonl")}
    choice, rolling = samples["samples_wikigpt_tiny_choice"], samples["samples_wikigpt_tiny_rolling"]
    assert len(choice) == len(rolling) == 3
    for s in choice:  # lm-eval splits context + continuation as it encodes them together
        ctx = tok(s["doc"]["context"], add_special_tokens=False)["input_ids"]
        for option, (got, _greedy) in zip(s["doc"]["choices"], s["filtered_resps"]):
            whole = tok(s["doc"]["context"] + option, add_special_tokens=False)["input_ids"]
            assert float(got) == pytest.approx(loglikelihood(tiny_lm, ctx, whole[len(ctx):]), abs=1e-3)
        best = max(range(3), key=lambda i: float(s["filtered_resps"][i][0]))
        assert s["acc"] == float(best == s["doc"]["answer"])
    total_ll = total_bytes = 0.0
    for s in rolling:
        text = s["doc"]["text"]
        want = loglikelihood(tiny_lm, [eos], tok(text, add_special_tokens=False)["input_ids"])
        assert float(s["filtered_resps"][0]) == pytest.approx(want, abs=1e-3)
        total_ll, total_bytes = total_ll + want, total_bytes + len(text.encode())
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["wikigpt_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
        -total_ll / (total_bytes * math.log(2)), rel=1e-4)
