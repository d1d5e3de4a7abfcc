"""`wikigpt push` and `wikigpt train --push-to-hub` through the real huggingface_hub client, against
the fake Hub on 127.0.0.1 (tests/fake_hub.py): the run is the suite's real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from .conftest import CORPUS
from .fake_hub import FakeHub

WIKIGPT = [sys.executable, "-m", "wikigpt.cli"]
TOKEN = "hf_fake_write_token"


def _cli(args, env_extra, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(env_extra)
    return subprocess.run(WIKIGPT + args, env=env, capture_output=True, text=True, timeout=timeout)


def _env(hub, tmp_path, token=TOKEN):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    return env | ({"HF_TOKEN": token} if token else {})


def _card(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_push_uploads_weights_tokenizer_and_a_card_of_the_run(trained_run, tiny_model_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    with FakeHub("fake-org/tiny-wiki", repo, commits=(), token=TOKEN) as hub:
        env = _env(hub, tmp_path)
        r = _cli(["push", str(trained_run), "--repo-id", "fake-org/tiny-wiki", "--private"], env)
        assert r.returncode == 0, r.stderr
        assert f"{hub.url}/fake-org/tiny-wiki/commit/{hub.commits[0]}" in r.stderr
        assert hub.private and len(hub.commits) == 1
        pushed = {p.name for p in repo.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "training_report.json", "eval_report.json", "README.md", "loss.png"} <= pushed
        assert not pushed & {"optimizer.safetensors", "trainer_state.json", "metrics.jsonl", "checkpoints"}
        assert (repo / "model.safetensors").read_bytes() == (trained_run / "final" / "model.safetensors").read_bytes()
        assert (repo / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        meta, card = _card(repo)
        assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
        assert "base_model" not in meta  # a local folder is no Hub id
        evaluated = json.loads((trained_run / "final" / "eval_report.json").read_text())["latest"]
        metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
        assert metrics["perplexity"] == round(evaluated["perplexity"], 4)
        assert metrics["bits_per_byte"] == round(evaluated["bits_per_byte"], 4)
        # the evaluation table names this model by its repository and the base by its folder
        assert "| fake-org/tiny-wiki |" in card and f"| {tiny_model_dir} (base) |" in card
        assert "![training and validation loss against tokens seen](loss.png)" in card
        assert "| learning_rate |" in card and "**tokens seen**: 3,072" in card
        assert 'pipeline("text-generation", model="fake-org/tiny-wiki")' in card

        # what was pushed loads back from the Hub and continues text as the local folder does
        args = ["generate", "Data science is", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
        remote = _cli(args + ["--model", "fake-org/tiny-wiki"], env)
        local = _cli(args + ["--model", str(trained_run / "final")], {})
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout and remote.stdout.startswith("Data science is")

        # pushing again: the repository exists (the Hub's 409) and a second commit lands on it
        again = _cli(["push", str(trained_run), "--repo-id", "tiny-wiki", "--commit-message", "second"], env)
        assert again.returncode == 0, again.stderr
        assert len(hub.commits) == 2 and hub.commit_messages[-1] == "second"


def test_push_without_a_token_or_with_a_refused_one_says_so(trained_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    with FakeHub("fake-org/tiny-wiki", repo, commits=(), token=TOKEN) as hub:
        missing = _cli(["push", str(trained_run), "--repo-id", "fake-org/tiny-wiki"], _env(hub, tmp_path, token=None))
        wrong = _cli(["push", str(trained_run), "--repo-id", "fake-org/tiny-wiki"], _env(hub, tmp_path, token="hf_bad"))
        assert not hub.exists and not list(repo.iterdir())
    assert missing.returncode == 2 and "no Hugging Face token" in missing.stderr and "HF_TOKEN" in missing.stderr
    assert wrong.returncode == 2 and "the Hub refused the token for fake-org/tiny-wiki (401" in wrong.stderr
    offline = _cli(["push", str(trained_run), "--repo-id", "fake-org/x"], {"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
    for r in (missing, wrong, offline):
        assert "Traceback" not in r.stderr


def test_train_push_to_hub_uploads_the_final_model(tiny_model_dir, tmp_path):
    text = tmp_path / "wiki.train.raw"
    text.write_text("".join(f" \n = Article {k} = \n \n {CORPUS.replace(chr(10), ' ')}\n" for k in range(12)))
    repo = tmp_path / "repo"
    repo.mkdir()
    train = ["train", "--preset", "smoke", "--model", str(tiny_model_dir), "--train-file", str(text),
             "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "--max-steps", "2"]
    with FakeHub("fake-org/run-7", repo, commits=(), token=TOKEN) as hub:
        no_token = _cli(train + ["--output-dir", str(tmp_path / "never"), "--push-to-hub"], _env(hub, tmp_path, None))
        r = _cli(train + ["--output-dir", str(tmp_path / "run-7"), "--push-to-hub"], _env(hub, tmp_path))
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr
    assert not (tmp_path / "never" / "final").exists()  # refused before training, not after
    assert r.returncode == 0, r.stderr
    assert "pushed to the Hugging Face Hub" in r.stderr and len(hub.commits) == 1
    assert (repo / "model.safetensors").read_bytes() == (tmp_path / "run-7" / "final" / "model.safetensors").read_bytes()
    meta, card = _card(repo)
    assert "model-index" not in meta and "Not evaluated yet" in card  # evaluate, then push, for the table
