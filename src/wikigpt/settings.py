"""Settings, one class per stage. Each field's docstring is its documentation: the CLI help and
validation errors are built from it (`use_attribute_docstrings`).

Every setting is read, in order of priority, from a CLI flag (`--max-new-tokens`), an
environment variable (`WIKIGPT_MAX_NEW_TOKENS`) or the default declared here. Defaults
finish in minutes on a laptop CPU; full-size runs live in the preset files under `configs/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .decoding import SamplingParams

# What `wikigpt serve`, `ui`, `generate`, `evaluate`, `make run` and compose serve without --model:
# DistilGPT2 fine-tuned on WikiText-103 by the authors of the RetoMaton paper (Alon et al.,
# ICML 2022; their card reports perplexity 18.25 on WikiText-103 test, sliding window), at a
# pinned commit so that every user gets the same weights.
DEFAULT_MODEL = "neulab/distilgpt2-finetuned-wikitext103"
# Training and tokenizing start from the base model: fine-tuning is what `wikigpt train` does.
BASE_MODEL = "distilbert/distilgpt2"
# Hub commits pinned per model id, used when --revision is not given. The Hub shows short ids;
# hub.resolve_revision turns one into the full commit id (from the repository's history
# online, from the cached snapshots offline) before anything is downloaded.
PINNED_REVISIONS = {DEFAULT_MODEL: "cc0607f"}


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WIKIGPT_", use_attribute_docstrings=True, extra="forbid", validate_default=True
    )


# Groups of fields that commands compose (as run_clm composes its argument dataclasses); each
# sits directly on _Settings, and a command lists the groups it takes in its bases, last group
# first (pydantic lists the fields of the last base first: model, revision, device, dtype).
class _Revision(_Settings):
    revision: str | None = None
    """Hub branch, tag or commit of --model (Hub ids only); default: the head of 'main', except
    for the default model, which is pinned to a commit."""


class _Model(_Settings):
    model: str = DEFAULT_MODEL
    """Hugging Face Hub id (downloaded once into the HF cache) or a local model directory
    (safetensors weights)."""


class _Device(_Settings):
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'. Training takes no
    ':N' (pick GPUs with CUDA_VISIBLE_DEVICES; under torchrun/accelerate launch each process
    takes its own) and its 'auto' is cuda, then cpu."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        base = value.split(":", 1)[0]
        if base not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("must be one of auto, cpu, cuda, cuda:N, mps")
        return value


class _Dtype(_Settings):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; 'auto' is bfloat16 on GPUs (float16 where bf16 is unsupported) and float32
    on CPUs, except that serving and evaluation take bfloat16 on CPUs whose bf16 matmuls are
    clearly faster (a quick probe at start-up: modeling.auto_dtype)."""


class ModelSettings(_Dtype, _Device, _Revision, _Model):
    """Which model to load and where to run it (what modeling.load_model reads)."""


class GenerateSettings(ModelSettings, SamplingParams):
    """Continue a prompt and stream the text to the terminal as it is generated."""

    prompt: str = Field(min_length=1)
    """The text to continue."""


class ServeSettings(ModelSettings):
    """Serve the model over HTTP: the original /predict route, OpenAI-compatible /v1/completions and
    /v1/chat/completions (streaming), /tokenize and /detokenize, health, readiness and Prometheus
    metrics, with continuous batching (docs/serving.md)."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 exposes the API to the network (only inside a container)."""
    port: int = Field(5000, ge=0, le=65535)
    """Port to listen on (0 picks a free one and logs it)."""
    max_batch_size: int = Field(32, ge=1, le=1024)
    """Most sequences decoded together; more requests wait in the queue."""
    queue_size: int = Field(256, ge=0, le=100_000)
    """Most requests waiting for a batch slot; beyond it requests get 503 with Retry-After."""
    quantization: Literal["auto", "none", "int8"] = "auto"
    """Weights of the products: 'int8' (per-row int8, a quarter of float32's bytes per token;
    CPU only), 'none' (--dtype's), or 'auto': int8 where one sequence's decoding step measures
    faster with it at start-up (GPT-2-family models on a CPU), else none. `GET /` says which.
    Its cost in perplexity: `wikigpt evaluate --quantization int8` (docs/engine.md#int8-weights)."""
    prefix_caching: bool = True
    """Keep a finished request's keys and values in its batch slot and start each prompt from
    the longest prefix a slot holds (a conversation's next turn, one context scored with several
    continuations, n > 1 choices): only the rest is computed. No memory beyond the preallocated
    cache; the least recently used slot is forgotten first. `GET /` says whether it is on, and
    usage.prompt_tokens_details.cached_tokens counts the tokens it supplied."""
    compile: bool = True
    """Let the start-up measurement try torch.compile'd decoding kernels (one-sequence products,
    attention); needs a C++ compiler. The first start compiles for about a minute on 2 cores,
    later starts reuse the cache."""
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    """Largest request body accepted, in bytes; larger ones get 413."""
    api_key: str | None = None
    """Bearer token required on every route except the health checks (/, /health, /ready);
    unset: no authentication. Prefer the env var WIKIGPT_API_KEY: flags show up in `ps`."""
    served_model_name: str | None = None
    """Model name reported by the API and expected in requests' `model` field; unset: --model."""
    stream_backlog: int = Field(256, ge=1, le=100_000)
    """Most chunks (about one per token) a streamed completion may have waiting for a client that
    stays connected but stops reading; beyond it the request is aborted and its slot freed."""
    shutdown_grace: float = Field(20.0, ge=0, le=3600)
    """Seconds a SIGTERM (or Ctrl-C) leaves requests in flight to finish while new ones get 503;
    those still running then end with an error event or a 503, and the server exits 0. A second
    signal stops at once. Docker Compose's stop_grace_period is a few seconds longer."""
    retry_after: int = Field(1, ge=1, le=3600)
    """Seconds clients are told to wait (Retry-After header) when the queue is full."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server log level. Request log lines carry method, route, status and timing, never prompt text."""
    upstream: str | None = None
    """Base URL of an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, another
    `wikigpt serve`) to forward completions to, e.g. http://vllm:8000, instead of loading a
    model here; --model then picks one of the upstream's models (default: its first)."""
    upstream_api_key: str | None = None
    """Bearer token sent to the upstream. Prefer the env var WIKIGPT_UPSTREAM_API_KEY."""
    upstream_connect_timeout: float = Field(5.0, gt=0, le=600)
    """Seconds to wait for the upstream to accept a connection; beyond it requests get 503."""
    upstream_read_timeout: float = Field(120.0, gt=0, le=3600)
    """Seconds to wait for the upstream's answer and for each next piece of a streamed one;
    beyond it requests get 504 (a queued request waits at the upstream within this time)."""

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith(("http://", "https://")) or len(value) <= len("https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        return value.rstrip("/").removesuffix("/v1") if value else value


class _ApiClient(_Settings):
    """Where a running `wikigpt serve` is, and how long to wait for it: what the web UI and
    `wikigpt score` share."""

    api_url: str = "http://127.0.0.1:5000"
    """Base URL of the wikigpt API (`wikigpt serve`); Docker Compose sets http://backend:5000."""
    api_key: str | None = None
    """Bearer token sent to the API, if the API was started with one."""
    connect_timeout: float = Field(3.0, gt=0, le=120)
    """Seconds to wait for the API to accept a connection before saying it is unreachable."""
    read_timeout: float = Field(60.0, gt=0, le=3600)
    """Seconds to wait for the API's answer, and for each next piece of a streamed answer,
    before saying it is too slow (the page never hangs on a stuck backend)."""

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:5000")
        return value.rstrip("/")


class UISettings(_ApiClient):
    """Serve the web UI (Streamlit), a page that talks to a running `wikigpt serve` over HTTP."""

    host: str = "127.0.0.1"
    """Address the UI listens on; 0.0.0.0 exposes it to the network (only inside a container)."""
    port: int = Field(8501, ge=1, le=65535)
    """Port the UI listens on."""
    status_interval: float = Field(10.0, ge=0, le=3600)
    """Seconds between live backend status checks in the sidebar; 0 checks only on page actions."""
    notebooks_dir: str | None = None
    """Directory holding train.ipynb and inference.ipynb for the download buttons; unset: the
    source checkout's notebooks/ folder, then ./notebooks."""
    compare_api_url: str | None = None
    """A second wikigpt API (e.g. the base model, where --api-url serves the fine-tuned one): the
    Score text page then shades both models' surprise side by side, with the difference."""
    wikitext_file: str | None = None
    """A WikiText raw file (e.g. wikitext-2-raw/wiki.test.raw) whose paragraphs the Score text
    page offers to pick from; unset: paste text only."""

    @field_validator("compare_api_url")
    @classmethod
    def _compare_url(cls, value: str | None) -> str | None:
        return None if value is None else cls._http_url(value)


class ScoreSettings(_ApiClient):
    """Score a text with the served model: every token's probability, its surprise in bits and
    the model's top alternatives, then perplexity and bits per byte (POST /v1/completions with
    max_tokens 0, echo and logprobs)."""

    text: str = Field(min_length=1)
    """A file to score (its whole content), or the text itself when no such file exists."""
    top_logprobs: int = Field(3, ge=0, le=20)
    """Alternatives shown for each token (the model's most likely next tokens there)."""
    plain: bool = False
    """A plain-text table even when `rich` is installed and the output is a terminal."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/wikigpt/data, ~/.cache/wikigpt/data when XDG_CACHE_HOME is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "wikigpt" / "data"


class _TextSource(_Settings):
    """Held-out text and its token cache: what training and evaluation share."""

    data: str | None = "wikitext-2-raw-v1"
    """Text source: a WikiText config on the Hugging Face Hub (wikitext-2-raw-v1,
    wikitext-103-raw-v1; wikitext-2-raw-v1's validation and test splits are WikiText-103's, the
    same articles, in a download of a few MB instead of hundreds), any Hub dataset with a 'text'
    column as hf:NAME[:CONFIG], or a local folder holding wiki.train.raw, wiki.valid.raw,
    wiki.test.raw. Ignored (and must not be given) when --train-file/--validation-file/
    --test-file name the files."""
    validation_file: str | None = None
    """A UTF-8 text file for the validation split instead of --data's; training without one
    holds out --validation-split-percent of the training text."""
    test_file: str | None = None
    """A UTF-8 text file for the test split (what `wikigpt evaluate` scores) instead of --data's."""
    cache_dir: str = Field(default_factory=lambda: str(default_cache_dir()))
    """Folder for token caches (a uint16 memmap + JSON metadata per split, keyed by a hash of
    the data files, split and tokenizer), shared by training and evaluation: a split is
    tokenized once."""


class DataSettings(_TextSource):
    """Where training and evaluation text comes from, and where its token cache lives."""

    train_file: str | None = None
    """A UTF-8 text file to train on (WikiText layout or any text)."""
    validation_split_percent: float = Field(5.0, ge=0.0, lt=100.0)
    """When the source has no validation split, hold out this percentage of the training
    articles (the last ones) as validation, as run_clm does; 0 trains without validation."""
    tokenizer: str | None = None
    """Tokenizer (Hub id or local directory); default: the model's (--model)."""


class PrepareSettings(DataSettings):
    """Tokenize a data source into the cached token streams that training reads, with counts."""

    model: str = BASE_MODEL
    """Model whose tokenizer to use when --tokenizer is not given (Hub id or local directory)."""


class TrainSettings(DataSettings, _Device, _Revision, _Model):
    """Fine-tune a causal LM (or train one from random weights) on packed blocks of a text source.

    Defaults are a quick look (30 steps of 4,096 tokens: minutes on a laptop CPU); presets in
    configs/ (--preset smoke|wikitext2-cpu|wikitext103-gpu|scratch-cpu) hold full-size runs.
    """

    model: str = BASE_MODEL
    """Model to fine-tune (Hub id or local directory with safetensors weights); with --init
    scratch, whose tokenizer and architecture to use unless given."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """'pretrained' fine-tunes --model's weights; 'scratch' builds a model of the architecture in
    --architecture from random weights (nanoGPT-style), with --tokenizer's vocabulary."""
    architecture: str | None = None
    """--init scratch: the architecture, as a model type ('gpt2': its default config), a
    config.json file, a model directory or a Hub id; default: --model's config."""
    config_overrides: str | None = None
    """--init scratch: comma-separated config changes, e.g. "n_layer=4,n_embd=256,n_head=4"."""
    new_vocab_size: int | None = Field(None, ge=256, le=65536)
    """--init scratch: train a new byte-level BPE tokenizer with this many tokens on the training
    split instead of using --tokenizer's. On a CPU the output layer (vocab x width) dominates a
    small model's cost, so a smaller vocabulary trains faster (docs/training.md#the-training-loop)."""
    output_dir: str = "runs/train"
    """Run folder: checkpoints/, metrics.jsonl and final/ (weights, tokenizer,
    generation_config.json, training_report.json)."""
    resume: bool = False
    """Continue exactly from the newest checkpoint in --output-dir (model, optimizer, schedule,
    data position, step-derived RNG)."""
    overwrite: bool = False
    """Delete the checkpoints and final model already in --output-dir instead of refusing to start."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast compute dtype; master weights and optimizer state stay float32. 'auto': bf16 on
    GPUs that support it (else fp16 with loss scaling), bf16 on CPUs whose bf16 matmuls are
    clearly faster (native units such as AMX: modeling.auto_dtype), else fp32."""
    compile: bool = False
    """torch.compile the model (faster steps on GPU after a minute of compiling)."""
    block_size: int = Field(256, ge=8, le=65536)
    """Tokens per training sequence; at most the model's context length."""
    batch_size: int = Field(4, ge=1, le=4096)
    """Sequences per forward pass, per process."""
    tokens_per_step: int = Field(4096, ge=8)
    """Tokens per optimizer step across all processes; gradients are accumulated over
    tokens_per_step / (batch_size x block_size x processes) passes (rounded to nearest, >= 1)."""
    max_steps: int = Field(30, ge=1)
    """Optimizer steps to train for (the cosine schedule spans them)."""
    epochs: float | None = Field(None, gt=0)
    """If set, train for this many passes over the training tokens instead of --max-steps."""
    max_minutes: float | None = Field(None, gt=0)
    """Stop after this much wall time, saving a checkpoint and the final model (the schedule is
    not shortened: a time-limited run ends before its learning rate has fully decayed)."""
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    """Peak learning rate (AdamW), reached after warm-up."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decay ends at learning_rate x this."""
    warmup_steps: int = Field(5, ge=0)
    """Steps of linear warm-up from 0 to the peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW decoupled weight decay (not applied to biases and LayerNorm weights)."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW beta2 (0.95 suits training from scratch)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_interval: int = Field(10, ge=0)
    """Measure validation perplexity every this many steps (0: only at the end)."""
    eval_tokens: int | None = Field(32768, ge=1)
    """Validation tokens per periodic evaluation (the first ones, the same each time); the
    final evaluation uses the whole validation split. Unset: always the whole split."""
    save_interval: int = Field(100, ge=0)
    """Write a checkpoint every this many steps (0: only when stopping)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed for weight init, data order and dropout; a run is reproducible from it."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss, ETA); a log line is printed at each evaluation either way."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log loss, learning rate, gradient norm, tokens/s and validation perplexity to a
    dashboard, through accelerate's trackers: 'tensorboard' writes OUTPUT_DIR/tensorboard/
    (`tensorboard --logdir OUTPUT_DIR`), 'wandb' a Weights & Biases run in project 'wikigpt'
    (`pip install wandb`, then `wandb login`). metrics.jsonl is written either way."""
    push_to_hub: bool = False
    """At the end of the run, upload the final model with its model card to the Hugging Face
    Hub (`wikigpt push`; needs a token: `hf auth login` or HF_TOKEN)."""
    hub_repo_id: str | None = Field(None, pattern=r"^([\w.-]+/)?[\w.-]+$")
    """--push-to-hub's repository (USER/NAME); default: --output-dir's folder name under the token's user."""
    hub_private: bool = False
    """--push-to-hub creates the repository private."""


# Fixed prompts for the report's sample continuations and the decoding-quality check:
# the original project's prompt, then openings in WikiText's style (none is in its test split).
DEFAULT_PROMPTS = (
    "Data Science is",
    "The history of the Roman Empire",
    "In 1905, Albert Einstein",
    "The game was released in",
    "The river rises in the mountains",
    " = Jupiter = \n\n Jupiter is",
    "During the Second World War, the battalion",
    "The album received",
)


def _comma_list(value):
    """An env var holds a list as comma-separated text (WIKIGPT_MODEL=a,b); flags repeat."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class EvalSettings(_TextSource, _Dtype, _Device, _Revision):
    """Perplexity, word perplexity and bits per byte of one or more models on a whole split,
    with a sliding window (the Hugging Face perplexity guide's method)."""

    model: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_MODEL], min_length=1, max_length=16)
    """Model to evaluate (Hub id or local directory); repeat --model to compare several in one
    table, e.g. --model distilbert/distilgpt2 --model runs/wikitext103-gpu/final."""
    split: Literal["test", "validation"] = "test"
    """Which split to score."""
    quantization: Literal["none", "int8", "both"] = "none"
    """'int8' evaluates the models with the int8 weights `wikigpt serve --quantization int8`
    serves (CPU, float32 activations); 'both' gives each model a full-precision and an int8
    row, so the table shows what int8 costs in perplexity."""
    stride: int | None = Field(None, ge=1)
    """Tokens the window moves each step; each window scores only its last `stride` tokens, so
    with GPT-2's 1024-token window and stride 512 every token is predicted from at least 512
    tokens of context. Default: 512, or half the window for models with a shorter context.
    Smaller is more accurate and slower (stride 512 costs 2x the forwards of stride 1024)."""
    window: int | None = Field(None, ge=2)
    """Tokens per window; default: the model's context length (1024 for GPT-2)."""
    max_tokens: int | None = Field(None, ge=2)
    """Score only the first N tokens of the split, for a quick partial run (marked partial)."""
    batch_size: int = Field(4, ge=1, le=1024)
    """Windows per forward pass; raise it on a GPU (32 fits easily in 16 GB for DistilGPT2)."""
    json_output: bool = Field(False, json_schema_extra={"cli_flag": "--json"})
    """Print the results as JSON on stdout instead of a table."""
    write_report: bool = True
    """Record the results in eval_report.json inside each evaluated model directory."""
    progress: bool = True
    """Show a progress bar on stderr."""

    _split_models = field_validator("model", mode="before")(_comma_list)


class _SampleSeed(_Settings):
    seed: int = Field(0, ge=0)
    """Seed of the sampled continuations: the same seed and settings give the same output."""


class DecodingCheckSettings(ModelSettings, _SampleSeed):
    """Compare greedy and default decoding over fixed prompts: repeated n-grams and
    runs of blank lines in the raw continuations (the original's greedy output degenerated)."""

    prompt: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1, max_length=64)
    """Prompt to continue; repeat --prompt for several. Default: eight fixed Wikipedia-style openings."""
    samples: int = Field(3, ge=1, le=64)
    """Sampled continuations per prompt with the default decoding (greedy is deterministic: one)."""
    max_new_tokens: int = Field(128, ge=8, le=1024)
    """Tokens generated per prompt (long enough for loops and newline runs to show)."""
    ngram: int = Field(4, ge=1, le=16)
    """n of the repeated n-gram share: 1 - distinct n-grams / n-grams, in tokens (rep-n of
    Welleck et al. 2019); 0 for text that never repeats itself."""
    json_output: bool = Field(False, json_schema_extra={"cli_flag": "--json"})
    """Print the results as JSON on stdout instead of a table."""



class ReportSettings(_SampleSeed, _Dtype, _Device, _Revision):
    """Write RUN_DIR/report.md: loss curves (PNG), base-vs-fine-tuned perplexity, sample
    continuations with the default decoding and the decoding-quality table."""

    run_dir: str = Field(min_length=1)
    """A training run's folder (holding training_report.json and the final model)."""
    model: str | None = None
    """Model to sample from; default: RUN_DIR/final, else RUN_DIR itself if it holds a model."""
    output: str | None = None
    """Markdown file to write; default RUN_DIR/report.md (the plot goes next to it)."""
    prompt: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1, max_length=64)
    """Prompt of a sample continuation; repeat --prompt for several. Default: the eight fixed
    prompts of `wikigpt decoding-check`."""
    max_new_tokens: int = Field(128, ge=1, le=1024)
    """Tokens per sample continuation and per decoding-check continuation."""
    decoding_check: bool = True
    """Include the greedy-vs-default decoding-quality table (about a minute for DistilGPT2 on a CPU)."""


class ExportSettings(_Revision, _Model):
    """Write a GPT-2-family model as one GGUF file for llama.cpp, Ollama and LM Studio, and an
    Ollama Modelfile beside it (docs/sharing.md)."""

    format: Literal["gguf"] = "gguf"
    """Output format: 'gguf', llama.cpp's (read by Ollama and LM Studio too)."""
    outtype: Literal["f32", "f16", "q8_0"] = "f16"
    """Weight type of the 2-D tensors (norms, biases and the position embedding stay f32, as
    llama.cpp's converter keeps them): 'f32' exact, 'f16' half the size, 'q8_0' llama.cpp's
    8-bit blocks (a quarter of f32's size)."""
    output: str | None = Field(None, json_schema_extra={"cli_flag": ["-o", "--output"]})
    """The .gguf file to write (the Modelfile goes next to it, FILE.Modelfile); default
    ./NAME-OUTTYPE.gguf in the current folder."""


class PushSettings(_Settings):
    """Upload a trained model to the Hugging Face Hub: safetensors weights, tokenizer, and a
    model card with the training settings, the evaluation table and the loss plot."""

    run_dir: str = Field(min_length=1)
    """A training run's folder (its final/ model is pushed), or a model folder."""
    repo_id: str = Field(min_length=1, pattern=r"^([\w.-]+/)?[\w.-]+$")
    """Hub repository, USER/NAME or ORG/NAME (NAME alone: under the token's user); created if missing."""
    private: bool = False
    """Create the repository private (an existing repository keeps its visibility)."""
    model: str | None = None
    """Model folder to push; default: RUN_DIR/final, else RUN_DIR itself."""
    commit_message: str = "Upload a model fine-tuned with wikigpt"
    """The Hub commit's message."""
