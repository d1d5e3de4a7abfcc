"""Training and evaluation text: where it comes from, how it becomes one token stream, and how
that stream is cached and cut into blocks.

A *source* is a WikiText config on the Hugging Face Hub (through `datasets`), a local folder
with `wiki.{train,valid,test}.raw`, or explicit files (any UTF-8 text). Each split becomes one
token stream: the text is cut into WikiText articles (an article starts at a ` = Title = `
line; ` = = Section = = ` lines stay inside it), each article is tokenized whole with the
model's fast tokenizer and followed by EOS, and the ids are concatenated. The stream is cached
as a flat uint16 file (uint32 for vocabularies over 65,536) plus a JSON of metadata, keyed by
a hash of (source files, split, tokenizer, format version), as nanoGPT does; a second run
memory-maps it in milliseconds. Training packs the stream into `block_size` blocks
(run_clm's group_texts idea: no padding, no per-line samples, every token is trained on).

Public API (also used by evaluate.py): `resolve_source`, `read_text`, `split_articles`,
`tokenize_documents`, `load_split`, `prepare`, `num_blocks`, `get_blocks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConfigError
from .files import atomic_path, write_atomic
from .settings import DataSettings, default_cache_dir

SPLITS = ("train", "validation", "test")
FOLDER_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
HUB_DATASET = "Salesforce/wikitext"
HUB_CONFIGS = ("wikitext-2-raw-v1", "wikitext-103-raw-v1", "wikitext-2-v1", "wikitext-103-v1")
CACHE_VERSION = 1
# An article title line is " = Title = " (one '=' each side); sections are " = = x = = ".
_TITLE = re.compile(r"^ = [^=](?:.*[^=])? = $")
# Text without article titles is tokenized in pieces of about this many characters, cut at a
# line end, so memory stays flat on huge files (tokens can differ only at the ~1 MB seams).
_CHUNK_CHARS = 1 << 20


class DataError(ConfigError):
    """The data source is missing, unreadable or lacks a needed split (exit code 2)."""


@dataclass(frozen=True)
class Source:
    """A resolved data source. `files` maps split -> local file; `carve` is the percentage of
    training articles held out as validation when the source has no validation split."""

    kind: Literal["hub", "folder", "files"]
    name: str
    files: dict[str, Path] = field(default_factory=dict)
    hub: tuple[str, str | None] | None = None
    carve: float = 0.0

    @property
    def splits(self) -> tuple[str, ...]:
        if self.kind == "hub":
            return SPLITS
        have = set(self.files)
        if "validation" not in have and "train" in have and self.carve > 0:
            have.add("validation")
        return tuple(s for s in SPLITS if s in have)

    def carved(self, split: str) -> bool:
        return self.kind != "hub" and split in ("train", "validation") and "validation" not in self.files and self.carve > 0


def resolve_source(settings: DataSettings, need: str = "train") -> Source:
    """Turn the data settings into a Source, or raise DataError saying what is wrong.

    `need`: the split a folder must hold ('train' for training; evaluation passes its split,
    so a folder with only wiki.test.raw can be evaluated)."""
    explicit = {s: getattr(settings, f"{s}_file") for s in SPLITS if getattr(settings, f"{s}_file")}
    carve = settings.validation_split_percent
    if explicit:
        if "data" in settings.model_fields_set and settings.data:
            raise DataError("--data and --train-file/--validation-file/--test-file are two ways to name the "
                            "data; pass one of them")
        files = {}
        for split, name in explicit.items():
            path = Path(name).expanduser()
            if not path.is_file():
                raise DataError(f"--{split}-file {name}: no such file")
            files[split] = path
        return Source("files", ", ".join(str(p) for p in files.values()), files=files, carve=carve)
    data = settings.data
    if not data:
        raise DataError("no data: pass --data (a WikiText config such as wikitext-2-raw-v1, or a folder "
                        "with wiki.train.raw) or --train-file FILE")
    if data in HUB_CONFIGS:
        return Source("hub", f"{HUB_DATASET}/{data}", hub=(HUB_DATASET, data))
    if data.startswith("hf:"):
        repo, _, config = data[3:].partition(":")
        if not repo:
            raise DataError(f"--data {data}: expected hf:NAME or hf:NAME:CONFIG")
        return Source("hub", data[3:], hub=(repo, config or None))
    path = Path(data).expanduser()
    if path.is_file():
        raise DataError(f"--data {data} is a file; pass it as --train-file (with --validation-split-percent "
                        "to hold out validation text) or --test-file")
    if not path.is_dir():
        raise DataError(f"--data {data}: no such folder, and not a known Hub dataset "
                        f"({', '.join(HUB_CONFIGS[:2])} or hf:NAME[:CONFIG])")
    files = {s: path / f for s, f in FOLDER_FILES.items() if (path / f).is_file()}
    if need != "train":
        if need not in files:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise DataError(f"--data {data}: the folder has no {need} split {FOLDER_FILES[need]} "
                            f"(found: {', '.join(found) or 'nothing'})")
        return Source("folder", str(path), files=files, carve=carve if "train" in files else 0.0)
    if "train" not in files:
        found = sorted(p.name for p in path.iterdir())
        hint = ""
        if "validation" in files:
            hint = (f"; to train on other text anyway, name the files: --train-file {files['validation']} "
                    f"--validation-split-percent 5" + (f" --test-file {files['test']}" if "test" in files else ""))
        raise DataError(f"--data {data}: the folder has no training split {FOLDER_FILES['train']} "
                        f"(found: {', '.join(found) or 'nothing'}){hint}")
    return Source("folder", str(path), files=files, carve=carve)


def split_articles(text: str) -> list[str]:
    """Cut WikiText into articles, each starting at its ` = Title = ` line (text before the first
    title joins the first article). Text with no titles comes back as one document."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _TITLE.match(line.rstrip("\r\n"))]
    if not starts:
        return [text] if text else []
    starts[0] = 0
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


def _carve(text: str, percent: float, split: str, what: str) -> str:
    """Hold out the last `percent` % of articles (of lines, for text without titles) as validation."""
    articles = split_articles(text)
    if len(articles) < 2:
        articles = text.splitlines(keepends=True)
    n_val = max(1, round(len(articles) * percent / 100))
    if n_val >= len(articles):
        raise DataError(f"{what} is too short to hold out {percent}% as validation")
    return "".join(articles[:-n_val] if split == "train" else articles[-n_val:])


def _read_file(path: Path) -> str:
    try:
        # WikiText's raw files are UTF-8 with '\n' line ends; newline="" keeps them exact.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def _hub_text(source: Source, split: str) -> str:
    repo, config = source.hub  # type: ignore[misc]
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for "not reachable"/"no such"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"could not load the Hub dataset {source.name} split '{split}': {first}. Without internet, "
            "pass a local folder (--data DIR with wiki.*.raw) or --train-file/--test-file") from None
    if "text" not in ds.column_names:
        raise DataError(f"the Hub dataset {source.name} has no 'text' column (columns: {ds.column_names})")
    # The Hub's WikiText has one row per raw-file line, newline included, and '' where the raw
    # file has a blank " \n" line; joining with that substitution restores the raw layout.
    return "".join(t if t else " \n" for t in ds["text"])


def read_text(source: Source, split: str) -> str:
    """The raw text of one split ('train', 'validation' or 'test')."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    if source.kind == "hub":
        return _hub_text(source, split)
    if source.carved(split):
        return _carve(_read_file(source.files["train"]), source.carve, split, str(source.files["train"]))
    if split not in source.files:
        hint = {
            "validation": "; set --validation-split-percent to hold out part of the training text, or pass --validation-file",
            "test": "; pass --test-file",
            "train": "; pass --train-file",
        }[split]
        raise DataError(f"the data source {source.name} has no {split} split{hint}")
    return _read_file(source.files[split])


def _fingerprint(source: Source, split: str) -> dict[str, Any]:
    if source.kind == "hub":
        return {"hub": list(source.hub), "split": split}  # type: ignore[arg-type]
    path = source.files["train" if source.carved(split) else split]
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    fp: dict[str, Any] = {"file": str(path.resolve()), "blake2b": digest.hexdigest(), "split": split}
    if source.carved(split):
        fp["carve_percent"] = source.carve
    return fp


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer {tokenizer.name_or_path!r} has no fast (Rust) version; "
                        "the data pipeline needs one")
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token to separate articles")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
    _require_fast(tokenizer)
    spec = tokenizer.backend_tokenizer.to_str() + f"|eos={tokenizer.eos_token_id}"
    return hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()


def _pieces(doc: str) -> Iterable[str]:
    if len(doc) <= _CHUNK_CHARS:
        yield doc
        return
    start = 0
    while start < len(doc):
        end = doc.find("\n", start + _CHUNK_CHARS)
        end = len(doc) if end < 0 else end + 1
        yield doc[start:end]
        start = end


def tokenize_documents(docs: list[str], tokenizer, progress: bool = False, desc: str = "tokenizing",
                       batch_docs: int = 512):
    """Yield uint token arrays: each document's ids followed by EOS, in order.

    Batches go through the Rust tokenizer's `encode_batch`, which spreads them over all cores
    (TOKENIZERS_PARALLELISM is switched on for the call; nothing is forked meanwhile).
    """
    _require_fast(tokenizer)
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(d) for d in docs), desc=desc, unit="char", unit_scale=True, leave=False)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        for i in range(0, len(docs), batch_docs):
            batch = docs[i : i + batch_docs]
            pieces, owners = [], []
            for j, doc in enumerate(batch):
                for piece in _pieces(doc):
                    pieces.append(piece)
                    owners.append(j)
            encoded = backend.encode_batch_fast(pieces, add_special_tokens=False)
            out: list[int] = []
            for k, enc in enumerate(encoded):
                out.extend(enc.ids)
                if k + 1 == len(encoded) or owners[k + 1] != owners[k]:
                    out.append(eos)
            yield np.asarray(out, dtype=dtype)
            if bar is not None:
                bar.update(sum(len(d) for d in batch))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
        if bar is not None:
            bar.close()


def _as_source(data: DataSettings | Source | str) -> Source:
    if isinstance(data, Source):
        return data
    if isinstance(data, str):
        data = DataSettings(data=data)
    return resolve_source(data)


def load_split(data: DataSettings | Source | str, split: str, tokenizer, cache_dir: str | os.PathLike | None = None,
               progress: bool = False) -> np.ndarray:
    """The token stream of one split as a read-only memmap, built and cached on first use.

    `data` is DataSettings, a resolved Source, or a `--data` string (Hub config or folder).
    """
    stream, _ = load_split_with_meta(data, split, tokenizer, cache_dir, progress)
    return stream


def load_split_with_meta(data, split, tokenizer, cache_dir=None, progress=False) -> tuple[np.ndarray, dict]:
    source = _as_source(data)
    if cache_dir is None:
        cache_dir = data.cache_dir if isinstance(data, DataSettings) and data.cache_dir else default_cache_dir()
    cache = Path(cache_dir).expanduser()
    if split not in source.splits:
        read_text(source, split)  # raises the error that explains the missing split
    key_spec = {"v": CACHE_VERSION, "source": _fingerprint(source, split), "tokenizer": tokenizer_fingerprint(tokenizer)}
    key = hashlib.blake2b(json.dumps(key_spec, sort_keys=True).encode(), digest_size=8).hexdigest()
    bin_path, meta_path = cache / f"{split}-{key}.bin", cache / f"{split}-{key}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            meta["cached"] = True
            return np.memmap(bin_path, dtype=meta["dtype"], mode="r"), meta
    start = time.perf_counter()
    text = read_text(source, split)
    docs = split_articles(text)
    cache.mkdir(parents=True, exist_ok=True)
    n_tokens, dtype = 0, np.uint16
    with atomic_path(bin_path) as tmp:
        with open(tmp, "wb") as f:
            for arr in tokenize_documents(docs, tokenizer, progress=progress, desc=f"tokenizing {split}"):
                f.write(arr.tobytes())
                n_tokens += len(arr)
                dtype = arr.dtype
        if n_tokens == 0:
            raise DataError(f"the {split} split of {source.name} is empty")
    meta = {
        "version": CACHE_VERSION, "key": key, "split": split, "source": source.name, "fingerprint": key_spec,
        "tokenizer": str(tokenizer.name_or_path), "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_documents": len(docs), "n_chars": len(text),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")  # written last: it marks a complete entry
    meta["cached"] = False
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r"), meta


def prepare(settings: DataSettings, tokenizer, splits: Iterable[str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Build (or find) the cache of every available split; returns each split's metadata."""
    source = resolve_source(settings)
    out = {}
    for split in splits or source.splits:
        _, meta = load_split_with_meta(source, split, tokenizer, settings.cache_dir, progress=progress)
        out[split] = meta
    return out


def num_blocks(tokens: np.ndarray, block_size: int) -> int:
    """How many non-overlapping training blocks the stream holds: each block is `block_size`
    inputs plus the next token as the last target, so consecutive blocks share one token."""
    return max(0, (len(tokens) - 1) // block_size)


def get_blocks(tokens: np.ndarray, indices: Iterable[int], block_size: int) -> np.ndarray:
    """Rows of `block_size + 1` token ids (int64): inputs are row[:-1], targets row[1:]."""
    return np.stack([np.asarray(tokens[i * block_size : i * block_size + block_size + 1], dtype=np.int64)
                     for i in indices])
