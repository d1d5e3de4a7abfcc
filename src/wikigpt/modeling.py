"""Loading and saving models: the only module that reads or writes model files.

A model is a Hugging Face Hub id or a local directory holding a GPT-2-family causal LM and its
tokenizer. A local directory must hold safetensors weights (what `save_model` writes). A Hub
repository is read at the commit and from the weights file hub.py picks (its pinned commit;
safetensors, or the Hub's safetensors conversion of that commit), else its `pytorch_model.bin`
through torch's weights-only unpickler, which rebuilds tensors and refuses any other object (no
code runs), never a plain pickle. Every failure to find or read one becomes a
ModelNotFoundError that names the model and says how to fix it; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import hub
from .decoding import SamplingParams
from .errors import ConfigError, ModelNotFoundError
from .settings import ModelSettings

# transformers, given a Hub repository with only pickle weights, starts a thread that asks the
# Hub's converter bot to open a pull request on that repository, with the user's token. Loading
# a model must not write to anyone's repository.
os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")

# What a model is loaded for; 'auto' dtypes differ between them (auto_dtype).
Use = Literal["generate", "serve", "evaluate", "train"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)


def context_length(config) -> int:
    """Most positions the model can attend over (GPT-2: n_positions); 0 when the config does not say."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":", 1)[0]
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}")
    if base == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: the MPS backend is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, use: Use = "generate") -> torch.dtype:
    """The dtype a --dtype setting names: the named one, or auto_dtype's for `use`."""
    if name == "auto":
        return auto_dtype(device, use)
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def auto_dtype(device: torch.device | str, use: Use) -> torch.dtype:
    """What 'auto' means, the one rule every command's --dtype / --precision follows.

    GPUs: bfloat16 (float16 where bf16 is unsupported). CPUs: bfloat16 where its matmuls are
    clearly faster (bf16_pays) for serving, evaluation and training, whose own loops gain from
    it; float32 for `generate` and the notebooks, which run transformers' `generate`, where the
    casts around each small product cost more than bf16 gains (benchmarks/generate_bench.py).
    Other devices: float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and use != "generate" and bf16_pays(device):
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies in bfloat16 than in float32, measured once.

    Measured, not read from CPU flags: the ratio spans two orders of magnitude between CPUs
    with native bf16 units (AMX) and CPUs that emulate bf16, and VMs hide flags. The probe is
    one decoding-shaped product (an MLP at batch 32: 32 x 768 @ 768 x 3,072) per dtype, best
    of 4, stopped early where bf16 is hopeless, so it costs milliseconds.
    """
    a, b = torch.randn(32, 768), torch.randn(768, 3072)

    def best_of(dtype: torch.dtype, limit: float = float("inf")) -> float:
        x, y = a.to(dtype), b.to(dtype)
        best = float("inf")
        for _ in range(4):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
            if best > limit:
                break
        return best

    fp32 = best_of(torch.float32)
    return fp32 / best_of(torch.bfloat16, limit=20 * fp32)


# bf16 must beat fp32 by this much on the matmul probe before a CPU computes in it: the probe
# times matmuls alone, while a real step also pays for the casts around them (weights,
# activations, fp32 logits for the loss).
BF16_MIN_SPEEDUP = 1.5


def bf16_pays(device: torch.device | str) -> bool:
    """Whether computing in bfloat16 on `device` is worth it: on CUDA, when the GPU supports
    it; on a CPU, when its bf16 matmuls are clearly faster (cpu_bf16_speedup); never on others."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def _looks_like_path(name: str) -> bool:
    """A Hub id is `org/name`; anything that exists on disk or starts like a path is a path."""
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _not_found(name: str, reason: str) -> ModelNotFoundError:
    hint = (
        "Pass a local model directory (--model ./runs/scratch-cpu/final) or a Hub id that "
        "exists, e.g. distilbert/distilgpt2; without internet, set HF_HUB_OFFLINE=1 to use "
        "models already in the Hugging Face cache."
    )
    return ModelNotFoundError(f"could not load model '{name}': {reason}. {hint}", param="model")


def _reason(exc: BaseException) -> str:
    """One line saying why loading failed, from the most telling exception in the chain."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(e) for e in chain)
    names = {type(e).__name__ for e in chain}
    if names & {"RepositoryNotFoundError", "GatedRepoError"} or "RepositoryNotFound" in text or " 401 " in text:
        return "no such model on the Hub (or it is private or gated: run `hf auth login` first)"
    if "offline mode" in text.lower() or "couldn't connect" in text or names & {"LocalEntryNotFoundError", "ConnectError"}:
        return "the Hugging Face Hub could not be reached and the model is not in the local cache"
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".:")


def load_model(settings: ModelSettings, use: Use = "generate") -> LoadedModel:
    """Load model and tokenizer, ready for batched generation (pad = EOS, left padding), in the
    dtype --dtype names (its 'auto' as auto_dtype has it for `use`)."""
    name = settings.model
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, use)
    source: str = name
    revision = settings.revision
    safetensors = True
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise _not_found(name, "no such directory")
        if not (path / "config.json").is_file():
            raise _not_found(name, "the directory has no config.json")
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.iterdir())[:10]
            raise _not_found(
                name,
                f"no *.safetensors weights in the directory (found: {', '.join(found) or 'nothing'}); "
                "pickle checkpoints (.bin, .pt) are never loaded",
            )
        source = str(path)
    try:
        if not _looks_like_path(name):
            revision, safetensors = hub.weights_source(name, hub.resolve_revision(name, revision, _not_found))
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, use_safetensors=safetensors, weights_only=True
        )
    except ModelNotFoundError:
        raise
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused an object
        raise _not_found(name, "its pytorch_model.bin holds more than tensors, and pickled objects are "
                               f"never loaded ({str(exc).splitlines()[0][:200]})") from None
    except (OSError, ValueError) as exc:
        # transformers wraps every Hub failure (repository not found, offline mode with an
        # empty cache, a network error, no safetensors file) into OSError or ValueError.
        raise _not_found(name, _reason(exc)) from None
    except Exception as exc:  # huggingface_hub / httpx errors that escape transformers' wrapping
        if type(exc).__module__.split(".")[0] in {"huggingface_hub", "httpx", "requests"}:
            raise _not_found(name, _reason(exc)) from None
        raise
    _pad_with_eos(tokenizer)
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    sampling: SamplingParams | None = None,
    extra_files: dict[str, dict] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write weights (safetensors), tokenizer, tuned generation_config.json and any JSON reports.

    `extra_tensors` maps file names to tensor dicts written as safetensors (training checkpoints
    keep the optimizer state there, so resuming never unpickles anything).

    Atomic: everything is written into a temporary sibling directory that is then renamed over
    the target, so a crash never leaves a half-written model behind.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generation_config = (sampling or SamplingParams()).generation_config(tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for filename, payload in (extra_files or {}).items():
            (tmp / filename).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        for filename, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / filename))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file written through `save_model(extra_tensors=...)`."""
    try:
        return load_file(str(path))
    except (OSError, ValueError) as exc:  # safetensors raises SafetensorError (a ValueError) on bad files
        raise ConfigError(f"cannot read {path}: {exc}") from None


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a Hub id or local directory, pad = EOS, or a ModelNotFoundError."""
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise _not_found(name, "no such directory")
    try:
        if _looks_like_path(name):
            tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
        else:
            tok = AutoTokenizer.from_pretrained(name, revision=hub.resolve_revision(name, revision, _not_found))
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise _not_found(name, _reason(exc)) from None
    return _pad_with_eos(tok)


def _pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """GPT-2 has no pad token; batches pad with EOS (masked out, so its id does not matter)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def init_model(config_source: str, tokenizer: PreTrainedTokenizerBase, overrides: str | None = None) -> PreTrainedModel:
    """A causal LM with random weights (float32) whose architecture comes from `config_source`
    (a model type such as 'gpt2' for its default config, a config.json file, a model directory
    or a Hub id), resized to the tokenizer's vocabulary.

    `overrides` is run_clm's `--config_overrides` syntax: "n_layer=4,n_embd=256,n_head=4".
    """
    from transformers import AutoConfig

    from transformers import CONFIG_MAPPING

    path = Path(config_source).expanduser()
    try:
        if config_source in CONFIG_MAPPING and not path.exists():  # a model type: its default config
            config = AutoConfig.for_model(config_source)
        elif path.is_file():
            config = AutoConfig.for_model(**json.loads(path.read_text()))
        else:
            config = AutoConfig.from_pretrained(str(path) if path.is_dir() else config_source)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_found(config_source, _reason(exc)) from None
    if overrides:
        try:
            config.update_from_string(overrides)
        except ValueError as exc:
            raise ConfigError(f"--config-overrides {overrides!r}: {exc}") from None
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as exc:  # e.g. n_embd not divisible by n_head, or not a causal LM
        raise ConfigError(f"cannot build a model from {config_source}: {exc}") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
