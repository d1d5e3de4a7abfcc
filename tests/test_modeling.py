import os
import subprocess
import sys

import pytest
import torch

from wikigpt.errors import ConfigError, ModelNotFoundError
from wikigpt.modeling import load_model, resolve_device, resolve_dtype, save_model
from wikigpt.decoding import SamplingParams
from wikigpt.settings import DEFAULT_MODEL, PINNED_REVISIONS, ModelSettings

from .fake_hub import FakeHub

WIKIGPT = [sys.executable, "-m", "wikigpt.cli"]


def test_local_directory_loads_ready_for_batching(tiny_lm):
    assert tiny_lm.device.type == "cpu"
    assert tiny_lm.dtype == torch.float32  # auto on CPU
    tok = tiny_lm.tokenizer
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    batch = tok(["a", "Data science is"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # short prompt padded on the left


def test_auto_device_and_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in {"cpu", "mps"}
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", torch.device("cpu"))


def test_bf16_override(tiny_model_dir):
    lm = load_model(ModelSettings(model=str(tiny_model_dir), dtype="bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: p, "no config.json"),
])
def test_missing_local_model_is_a_clear_error(tmp_path, make, reason):
    with pytest.raises(ModelNotFoundError, match=reason) as err:
        load_model(ModelSettings(model=str(make(tmp_path))))
    assert str(make(tmp_path)) in err.value.message and "HF_HUB_OFFLINE" in err.value.message


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="pickle checkpoints"):
        load_model(ModelSettings(model=str(d)))


def test_save_is_atomic_and_stores_generation_defaults(tmp_path, tiny_lm):
    out = tmp_path / "saved"
    save_model(tiny_lm.model, tiny_lm.tokenizer, out, SamplingParams(temperature=0.7, top_k=40))
    save_model(tiny_lm.model, tiny_lm.tokenizer, out, SamplingParams(temperature=0.7, top_k=40))  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp dirs left behind
    import json
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["top_k"] == 40
    assert gen["repetition_penalty"] == SamplingParams().repetition_penalty
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def _cli(args, env_extra, timeout=180):
    env = dict(os.environ, **env_extra)
    return subprocess.run(WIKIGPT + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_hub_download_through_the_real_client(tiny_model_dir, tmp_path):
    """Real huggingface_hub/transformers code; only the HTTP server at the other end is ours."""
    with FakeHub("fake-org/tiny-gpt2", tiny_model_dir) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        ok = _cli(["generate", "Data science is", "--model", "fake-org/tiny-gpt2", "--seed", "1",
                   "--max-new-tokens", "8"], env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("Data science is")
        assert any("model.safetensors" in r for r in hub.requests)
        missing = _cli(["generate", "x", "--model", "fake-org/no-such-model"], env)
    assert missing.returncode == 2
    assert "fake-org/no-such-model" in missing.stderr and "no such model on the Hub" in missing.stderr
    assert "Traceback" not in missing.stderr
    # Offline now: the cached copy still loads, an uncached id fails clearly.
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert _cli(["generate", "x", "--model", "fake-org/tiny-gpt2", "--max-new-tokens", "2"], offline).returncode == 0
    gone = _cli(["generate", "x", "--model", "distilbert/distilgpt2"], offline)
    assert gone.returncode == 2 and "could not be reached" in gone.stderr and "Traceback" not in gone.stderr


PINNED_FULL = PINNED_REVISIONS[DEFAULT_MODEL] + "0" * (40 - len(PINNED_REVISIONS[DEFAULT_MODEL]))


def _pickle_repo(tmp_path, tiny_model_dir, weights: bytes | None = None):
    """A repository shaped like the default model's: config, tokenizer, and pytorch_model.bin
    as its only weights (no safetensors)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (repo / f.name).write_bytes(f.read_bytes())
    if weights is None:
        from safetensors.torch import load_file
        torch.save(load_file(tiny_model_dir / "model.safetensors"), repo / "pytorch_model.bin")
    else:
        (repo / "pytorch_model.bin").write_bytes(weights)
    return repo


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_default_model_is_the_pinned_fine_tune(tiny_model_dir, tmp_path):
    """Without --model, the fine-tuned model is fetched at its pinned commit (the short id
    resolved through the repository's history), never at the head of main; its pickle weights
    load through the weights-only unpickler; offline, the cached pinned snapshot serves."""
    repo = _pickle_repo(tmp_path, tiny_model_dir)
    history = ("f" * 40, PINNED_FULL, "a" * 40)  # a newer head, the pinned commit, an older one
    with FakeHub(DEFAULT_MODEL, repo, commits=history) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        ok = _cli(["generate", "Data science is", "--seed", "1", "--max-new-tokens", "4"], env)
        assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Data science is")
    downloads = [r for r in hub.requests if "/resolve/" in r]
    assert any(f"/resolve/{PINNED_FULL}/pytorch_model.bin" in r for r in downloads)
    assert all(f"/resolve/{PINNED_FULL}/" in r for r in downloads), downloads
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert _cli(["generate", "x", "--max-new-tokens", "2"], offline).returncode == 0
    empty = _cli(["generate", "x"], {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")})
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert DEFAULT_MODEL in empty.stderr and "could not be reached" in empty.stderr
    assert "--model ./" in empty.stderr  # how to use a local model instead


def test_a_malicious_pickle_is_refused(tiny_model_dir, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    repo = _pickle_repo(tmp_path, tiny_model_dir, weights=pickle.dumps({"h.0": _Exploit(marker)}))
    with FakeHub(DEFAULT_MODEL, repo, commits=(PINNED_FULL,)) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        bad = _cli(["generate", "x", "--max-new-tokens", "2"], env)
    assert any("pytorch_model.bin" in r for r in hub.requests)  # it was fetched, and refused
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "pickled objects are never loaded" in bad.stderr and DEFAULT_MODEL in bad.stderr
    assert not marker.exists()


def test_a_short_revision_not_in_the_history_is_a_clear_error(tiny_model_dir, tmp_path):
    with FakeHub("fake-org/tiny-gpt2", tiny_model_dir, commits=("b" * 40,)) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        r = _cli(["generate", "x", "--model", "fake-org/tiny-gpt2", "--revision", "cc0607f"], env)
    assert r.returncode == 2 and "commit cc0607f is not in its history" in r.stderr


CONVERTED = "c" * 40  # the converter bot's commit on top of the pinned one, adding model.safetensors


@pytest.mark.parametrize("author, parent, used", [
    ("SFconvertbot", PINNED_FULL, True),      # the Hub's conversion of the pinned commit
    ("mallory", PINNED_FULL, False),          # the same title from anyone else
    ("SFconvertbot", "f" * 40, False),        # a conversion of another commit
])
def test_the_safetensors_conversion_of_the_pinned_commit_is_preferred(tiny_model_dir, tmp_path, author, parent, used):
    """A repository with only a pickle at the pinned commit and the converter bot's open pull
    request adding model.safetensors on top of it (as the default model's repository has): the
    conversion's safetensors load and the pickle is never fetched; offline, the conversion is
    found again. Any other pull request is ignored."""
    repo = _pickle_repo(tmp_path, tiny_model_dir)
    (repo / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    history = ("f" * 40, PINNED_FULL, "a" * 40)
    pull = {"num": 1, "author": author, "title": "Adding `safetensors` variant of this model",
            "commits": [CONVERTED, parent, *history[history.index(parent) + 1:]]}
    with FakeHub(DEFAULT_MODEL, repo, commits=history, hidden={c: {"model.safetensors"} for c in history},
                 pulls=[pull]) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        ok = _cli(["generate", "Data science is", "--seed", "1", "--max-new-tokens", "4"], env)
        assert ok.returncode == 0, ok.stderr
    downloads = [r for r in hub.requests if "/resolve/" in r]
    if used:
        assert any(f"/resolve/{CONVERTED}/model.safetensors" in r for r in downloads), downloads
        assert not any("pytorch_model.bin" in r for r in downloads)
        offline = _cli(["generate", "x", "--max-new-tokens", "2"], {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
        assert offline.returncode == 0, offline.stderr
    else:
        assert any(f"/resolve/{PINNED_FULL}/pytorch_model.bin" in r for r in downloads), downloads
        assert not any(CONVERTED in r for r in downloads)
