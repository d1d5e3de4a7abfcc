"""Shared fixtures: a tiny random GPT-2 with its own small tokenizer, built in a temp dir.

Nothing here needs the network or the files in ../shared: the tokenizer is a byte-level BPE
trained in-process on a paragraph of text, so fast tests run anywhere. Tests that need the
real GPT-2 tokenizer or WikiText use `shared_tokenizer_dir` / `wikitext_dir`, which skip
cleanly when ../shared is absent.

`require(condition, reason)` is how a test says it needs something this machine may lack
(../shared, a Docker engine, Chromium): a developer's `make test` skips with the reason; under
CI=true (set by CI and by .ci/run) the test fails with it, so CI never goes green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.common import free_port  # noqa: F401 (tests import it from here)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers started by tests skip torch.compile's start-up measurement (tens of seconds per start
# on 2 cores); the compiled kernels have their own tests in test_engine_forward.py.
os.environ.setdefault("WIKIGPT_COMPILE", "false")
# ... and serve full precision, so their outputs can be compared with transformers' own forward;
# int8 serving has its own tests in test_quantize.py.
os.environ.setdefault("WIKIGPT_QUANTIZATION", "none")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WIKIGPT_SHARED", REPO.parent / "shared"))

CORPUS = """ = Data science =
Data science is an interdisciplinary field that uses statistics, scientific computing,
scientific methods, processes, algorithms and systems to extract or extrapolate knowledge
and insights from noisy, structured and unstructured data. The history of the Roman Empire
covers the history of ancient Rome from the fall of the Roman Republic in 27 BC until the
abdication of Romulus Augustulus in AD 476 in the West. Wikipedia is a free online
encyclopedia written and maintained by a community of volunteers.
"""


CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: object, reason: str) -> None:
    """Skip the calling test (or fixture) with `reason` unless `condition` holds; fail under CI=true."""
    __tracebackhide__ = True  # reports point at the test, not here
    if condition:
        return
    if CI:
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the test instead of skipping it)", pytrace=False)
    pytest.skip(reason)


def make_tiny_model(out_dir: Path, n_layer: int = 2, n_embd: int = 64, n_positions: int = 256, **config) -> Path:
    """A 2-layer random GPT-2 (~0.1 M params) and a 512-token BPE tokenizer, saved like a real
    model; `config`: more GPT2Config fields."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, set_seed

    from wikigpt.modeling import save_model

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 4, vocab_size=512, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=n_positions,
    )
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    set_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=eos, eos_token_id=eos, **config,
    )
    model = GPT2LMHeadModel(cfg)
    tok.pad_token = tok.eos_token
    return save_model(model, tok, out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from wikigpt.modeling import load_model
    from wikigpt.settings import ModelSettings

    return load_model(ModelSettings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """8,192-token context: 4,000 tokens keep a request decoding for many seconds."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "long", n_layer=4, n_embd=256, n_positions=8192)


@pytest.fixture(scope="session")
def shared_tokenizer_dir() -> Path:
    path = SHARED / "models" / "gpt2-tokenizer"
    require((path / "tokenizer.json").is_file(), f"real GPT-2 tokenizer not found at {path}")
    return path


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    path = SHARED / "data" / "wikitext-2-raw"
    require((path / "wiki.valid.raw").is_file(), f"WikiText-2 raw splits not found at {path}")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real (smoke) training run of the tiny model, then `wikigpt evaluate` of base and tuned in
    one command: the run folder `wikigpt report` and `wikigpt push` read."""
    from wikigpt import cli
    from wikigpt.presets import build
    from wikigpt.settings import TrainSettings
    from wikigpt.train import train

    tmp = tmp_path_factory.mktemp("report")
    text = tmp / "wiki.test.raw"
    text.write_text("".join(f" \n = Article {k} = \n \n {CORPUS.replace(chr(10), ' ')}\n" for k in range(12)))
    values = dict(model=str(tiny_model_dir), train_file=str(text), cache_dir=str(tmp / "cache"),
                  output_dir=str(tmp / "run"), device="cpu", progress=False, max_steps=6)
    train(build(TrainSettings, values, preset="smoke"))
    run = tmp / "run"
    rc = cli.main(["evaluate", "--model", str(tiny_model_dir), "--model", str(run / "final"), "--test-file",
                   str(text), "--cache-dir", str(tmp / "cache"), "--no-progress", "--stride", "128"])
    assert rc == 0
    return run
