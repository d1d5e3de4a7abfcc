"""`wikigpt push RUN_DIR --repo-id USER/NAME` (and `wikigpt train --push-to-hub`): a fine-tune on
the Hugging Face Hub with a model card, as `run_clm.py --push_to_hub` leaves one.

Uploaded, in one commit (huggingface_hub's `create_commit`; the Hub picks LFS/Xet for the large
files): the model folder's weights (safetensors only), config, generation config, tokenizer
files and JSON reports, the card as README.md and the loss plot as loss.png. Never a checkpoint's
optimizer or trainer state, nor anything else of the run folder.

The card is built from what the run wrote, nothing measured again:
- YAML metadata the Hub indexes: base_model (a Hub id only), datasets (a Hub dataset only),
  pipeline_tag, tags, and a model-index entry per `wikigpt evaluate` result of this model
  (perplexity, word perplexity, bits per byte), which the Hub shows as evaluation results;
- the evaluation table of `wikigpt report` (base vs tuned where both were evaluated in one
  command), the training numbers and the loss plot, the training settings, how to use it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .errors import AuthenticationError, ConfigError, HubError, WikigptError
from .evalreport import read_eval_report, result_key
from .report import find_model_dir, loss_curves, perplexity_section, plot_losses, read_training_report, training_section
from .settings import PushSettings

# The model folder's files that make up a model on the Hub (save_model writes them).
PUSHED = ("*.safetensors", "config.json", "generation_config.json", "tokenizer*.json", "special_tokens_map.json",
          "vocab.json", "merges.txt", "chat_template.jinja", "training_report.json", "eval_report.json")
NOT_PUSHED = ("optimizer.safetensors",)  # a checkpoint's optimizer state
# Training settings a reader wants in the card (the rest are paths and switches of this machine).
HYPERPARAMETERS = ("init", "learning_rate", "min_lr_ratio", "warmup_steps", "max_steps", "epochs", "tokens_per_step",
                   "block_size", "batch_size", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "precision",
                   "seed", "data", "config_overrides", "new_vocab_size")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def _dataset(settings: dict) -> tuple[str | None, str | None]:
    """(Hub dataset, config) the run trained on, or (None, None) for local files."""
    from .data import HUB_CONFIGS, HUB_DATASET

    data = settings.get("data")
    if not data or settings.get("train_file"):
        return None, None
    if data in HUB_CONFIGS:
        return HUB_DATASET, data
    if data.startswith("hf:"):
        repo, _, config = data[3:].partition(":")
        return repo, config or None
    return None, None


def card_metadata(repo_id: str, model_dir: Path, treport: dict | None):
    """huggingface_hub's ModelCardData: what the Hub indexes and shows beside the card."""
    from huggingface_hub import EvalResult, ModelCardData

    st = (treport or {}).get("settings", {})
    base = st.get("model") if st.get("init", "pretrained") == "pretrained" else None
    dataset, config = _dataset(st)
    results = []
    for r in (read_eval_report(model_dir) or {}).get("results", []):
        if not isinstance(r, dict) or result_key(r) is None:
            continue
        data = f"{r['data']} {r.get('split') or ''}".strip()
        for metric, name in (("perplexity", "Perplexity"), ("word_perplexity", "Word perplexity"),
                             ("bits_per_byte", "Bits per byte")):
            results.append(EvalResult(task_type="text-generation", task_name="Causal language modeling",
                                      dataset_type=data, dataset_name=data, dataset_split=r.get("split"),
                                      metric_type=metric, metric_name=name, metric_value=round(float(r[metric]), 4)))
    return ModelCardData(
        language=["en"], library_name="transformers", pipeline_tag="text-generation",
        tags=["wikigpt", "gpt2", "text-generation"], base_model=base if _is_hub_id(base) else None,
        datasets=[dataset] if dataset else None, model_name=repo_id, eval_results=results or None,
    )


def render_card(repo_id: str, model_dir: Path, treport: dict | None, png: str | None) -> str:
    """README.md: the metadata block, then the card's sections."""
    from huggingface_hub import ModelCard

    st = (treport or {}).get("settings", {})
    base = st.get("model") if st.get("init", "pretrained") == "pretrained" else None
    dataset, config = _dataset(st)
    source = ((treport or {}).get("data") or {}).get("source")
    what = (f"a fine-tune of [{base}](https://huggingface.co/{base})" if _is_hub_id(base)
            else f"a fine-tune of `{base}`" if base else "a GPT-2-family model trained from random weights")
    on = f"[{dataset}](https://huggingface.co/datasets/{dataset})" + (f" ({config})" if config else "") \
        if dataset else f"`{source}`" if source else "text"

    def label(model: str) -> str:  # local paths in the eval report -> the names a reader knows
        if Path(model).expanduser().resolve() == model_dir.resolve():
            return repo_id
        return model

    rows = [f"| {k} | {st[k]} |" for k in HYPERPARAMETERS if st.get(k) is not None]
    torch_version = (treport or {}).get("torch")
    from . import __version__

    parts = [
        f"# {repo_id.split('/')[-1]}\n",
        f"This model is {what}, trained on {on} with wikigpt (causal language modeling on packed "
        "blocks of text).\n",
        "## Evaluation\n", perplexity_section(model_dir, base, label=label),
        "## Training\n", training_section(treport, png),
        "## Training settings\n", ("| setting | value |\n| --- | --- |\n" + "\n".join(rows) + "\n") if rows else "Not recorded.\n",
        "## Use it\n",
        "```python\nfrom transformers import pipeline\n\n"
        f"generate = pipeline(\"text-generation\", model=\"{repo_id}\")\n"
        "print(generate(\"Data Science is\", max_new_tokens=40)[0][\"generated_text\"])\n```\n",
        f"Served with wikigpt (HTTP API and web UI): `wikigpt serve --model {repo_id}`; for llama.cpp, Ollama "
        f"or LM Studio: `wikigpt export {repo_id} --outtype q8_0`.\n",
        "## Framework versions\n",
        f"- wikigpt {__version__}\n" + (f"- torch {torch_version}\n" if torch_version else ""),
    ]
    return str(ModelCard(f"---\n{card_metadata(repo_id, model_dir, treport).to_yaml()}\n---\n\n" + "\n".join(parts)))


def _hub_error(exc: Exception, repo_id: str) -> WikigptError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return ConfigError("HF_HUB_OFFLINE is set: pushing needs the Hugging Face Hub (unset HF_HUB_OFFLINE)")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = (getattr(exc, "server_message", None) or str(exc).splitlines()[0])[:300]
    if status in (401, 403):
        return AuthenticationError(f"the Hub refused the token for {repo_id} ({status}: {detail}); it needs write "
                                   "access (https://huggingface.co/settings/tokens)")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"the Hub failed to take {repo_id} ({status}: {detail})")
    return HubError(f"the Hub could not be reached for {repo_id} ({type(exc).__name__}: {detail})")


def hub_token() -> str:
    """The token huggingface_hub would send (HF_TOKEN, else `hf auth login`'s), or a clear error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise AuthenticationError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with "
                                  "write access (https://huggingface.co/settings/tokens)")
    return token


def push(run_dir: Path, repo_id: str, *, private: bool = False, model: str | None = None,
         commit_message: str = "Upload a model fine-tuned with wikigpt") -> str:
    """Upload the run's model with its card; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    model_dir = find_model_dir(run_dir, model)
    files = sorted({p for pattern in PUSHED for p in model_dir.glob(pattern) if p.name not in NOT_PUSHED})
    if not any(p.suffix == ".safetensors" for p in files):
        raise ConfigError(f"{model_dir} has no safetensors weights to push")
    api = HfApi(token=hub_token())
    try:
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            treport = read_training_report(run_dir, model_dir)
            png = None
            if treport is not None:
                png = plot_losses(*loss_curves(run_dir, treport), f"{repo_id}: loss against tokens seen",
                                  Path(tmp) / "loss.png").name
            card = render_card(repo_id, model_dir, treport, png)
            ops = [CommitOperationAdd(p.name, str(p)) for p in files]
            ops.append(CommitOperationAdd("README.md", card.encode()))
            if png:
                ops.append(CommitOperationAdd("loss.png", str(Path(tmp) / png)))
            info = api.create_commit(repo_id, ops, commit_message=commit_message)
    except WikigptError:
        raise
    except Exception as exc:  # huggingface_hub's HTTP and offline errors, httpx's transport errors
        if type(exc).__module__.split(".")[0] in {"huggingface_hub", "httpx"}:
            raise _hub_error(exc, repo_id) from None
        raise
    return info.commit_url


def run(s: PushSettings) -> int:
    url = push(Path(s.run_dir).expanduser(), s.repo_id, private=s.private, model=s.model,
               commit_message=s.commit_message)
    print(f"wikigpt push: {url}", file=sys.stderr)
    return 0
