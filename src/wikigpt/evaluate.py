"""Perplexity over a whole split, computed the standard way so it compares with published numbers.

Method (the Hugging Face "Perplexity of fixed-length models" guide): the split is one token
stream; a window of the model's context length (1024 for GPT-2) slides over it `stride` tokens
at a time, and each window scores only the tokens that no earlier window scored, so every token
is counted exactly once and, with stride 512, is predicted from at least 512 tokens of context
(window 1024 - stride 512). The stream's first token has no context and is not scored, so
`wikigpt evaluate` puts an EOS in front of the split (articles are already separated by EOS):
every token of the text is scored, as the harness below prefixes each document with EOT.

    perplexity      = exp(NLL / scored tokens)              NLL: summed -ln p, in nats
    word_perplexity = exp(NLL / words)                      words: whitespace-separated pieces
    bits_per_byte   = NLL / (bytes * ln 2)                  bytes: UTF-8 bytes of the text
    byte_perplexity = 2 ** bits_per_byte

Words and bytes are those of the text that was scored, i.e. the raw WikiText as in the files
(no detokenisation: " @-@ ", " , " and the " = Title = " lines are scored as they are), counted
on the tokens' decoded text. This is lm-evaluation-harness's `wikitext` normalisation (total
loglikelihood over `len(re.split(r"\\s+", page))` words and `len(page.encode())` bytes of the
original, non-detokenised pages) with two documented differences: the harness scores its
detokenised pages one article at a time (each starting from EOT alone) while we score the raw
stream with 512+ tokens of context, and `re.split` also counts the empty strings at a page's two
ends, at most 2 of ~4,000 words per article (< 0.05 %).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # text bar on stderr (tqdm.auto wants ipywidgets in notebooks)

from .errors import ConfigError
from .evalreport import REPORT_FILE, read_eval_report, result_key, write_eval_report  # noqa: F401 (re-exported)
from .modeling import LoadedModel
from .tables import markdown_table

if TYPE_CHECKING:
    from .settings import EvalSettings

@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first_target: int  # first token scored; the window scores [first_target, end)

    @property
    def shape(self) -> tuple[int, int]:
        return self.end - self.begin, self.end - self.first_target


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The guide's loop: windows start every `stride` tokens, each scores what is new to it.

    stride == window (disjoint windows) steps by window - 1 instead: a window's first token has
    no context inside it, so the guide leaves it unscored (one token in 1,024 never counted);
    overlapping by one token scores it, as lm-evaluation-harness's rolling windows do.
    """
    if window < 2:
        raise ConfigError(f"--window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"--stride must be between 1 and the window ({window} tokens), got {stride}")
    if n_tokens < 2:
        raise ConfigError(f"the text is {n_tokens} token(s) long; perplexity needs at least 2")
    windows, scored_to = [], 1  # token 0 has no context, so it is never a target
    for begin in range(0, n_tokens, min(stride, window - 1)):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def default_stride(window: int) -> int:
    """512 for GPT-2's 1024-token window (the guide's setting); half the window when shorter."""
    return min(512, max(1, window // 2))


def count_text(tokenizer, ids: list[int]) -> tuple[int, int]:
    """(words, bytes) of the text the tokens spell, special tokens (article separators) excluded.

    GPT-2's byte-level BPE is lossless, so decoding gives back the exact text that was scored.
    Each run between special tokens is counted separately so separators never merge two words.
    """
    special = set(tokenizer.all_special_ids)
    words = n_bytes = 0
    run: list[int] = []
    for i in [*ids, None]:
        if i is None or i in special:
            if run:
                text = tokenizer.decode(run, clean_up_tokenization_spaces=False)
                words += len(text.split())
                n_bytes += len(text.encode("utf-8"))
            run = []
        else:
            run.append(i)
    return words, n_bytes


@dataclass
class EvalResult:
    model: str
    data: str
    split: str | None
    n_tokens: int  # tokens scored
    n_words: int
    n_bytes: int
    nll: float  # summed negative log-likelihood, nats
    window: int
    stride: int
    n_windows: int
    mean_context: float  # average tokens of context behind each scored token
    complete: bool  # False when --max-tokens cut the split short
    dtype: str
    device: str
    seconds: float
    forward_tokens: int  # tokens through the model (> n_tokens when windows overlap)
    token_nll: torch.Tensor | None = field(default=None, repr=False)  # per stream position; nan = unscored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.n_words) if self.n_words else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.n_bytes * math.log(2)) if self.n_bytes else math.nan

    @property
    def byte_perplexity(self) -> float:
        return 2.0**self.bits_per_byte

    @property
    def tokens_per_s(self) -> float:
        """Model forward throughput (what hardware and dtype change), not scored tokens per second."""
        return self.forward_tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "token_nll"}
        for name in ("perplexity", "word_perplexity", "bits_per_byte", "byte_perplexity", "tokens_per_s"):
            d[name] = getattr(self, name)
        return d


@torch.inference_mode()
def sliding_window_nll(
    lm: LoadedModel,
    ids: list[int] | torch.Tensor,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[torch.Tensor, list[Window]]:
    """Per-token NLL (nats, float64; nan where unscored) of a token stream, windows batched."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    window = window or lm.context_length
    windows = plan_windows(len(ids), window, stride or default_stride(window))
    token_nll = torch.full((len(ids),), math.nan, dtype=torch.float64)
    bar = tqdm(total=len(ids) - 1, unit="tok", desc=f"perplexity {lm.name}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    i = 0
    while i < len(windows):
        # Windows of one shape (all but the first and the last) go through the model together.
        batch = [windows[i]]
        while i + len(batch) < len(windows) and len(batch) < batch_size and windows[i + len(batch)].shape == batch[0].shape:
            batch.append(windows[i + len(batch)])
        i += len(batch)
        length, k = batch[0].shape
        x = torch.stack([ids[w.begin : w.end] for w in batch]).to(lm.device)
        # Only the last k+1 positions' logits are needed (a k x 50,257 slice instead of the
        # full window): position j predicts token j+1, so the last logit predicts nothing here.
        # An explicit all-ones mask: the EOS between articles is also GPT-2's pad id, but here it
        # is text to attend to, and transformers warns when it has to guess.
        logits = lm.model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=k + 1).logits[:, :-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, length - k :].flatten(), reduction="none")
        nll = nll.view(len(batch), k).double().cpu()
        for row, w in enumerate(batch):
            token_nll[w.first_target : w.end] = nll[row]
        bar.update(k * len(batch))
    bar.close()
    return token_nll, windows


def evaluate_ids(
    lm: LoadedModel,
    ids: list[int],
    *,
    data: str = "text",
    split: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = False,
    keep_token_nll: bool = False,
) -> EvalResult:
    """Perplexity, word perplexity and bits per byte of a token stream (see the module docstring)."""
    ids = list(ids)
    complete = max_tokens is None or len(ids) <= max_tokens
    if not complete:
        ids = ids[:max_tokens]
    window = window or lm.context_length
    if window > lm.context_length:
        raise ConfigError(f"--window {window} is longer than the model's context ({lm.context_length} tokens)")
    stride = stride or default_stride(window)
    if stride > window:
        raise ConfigError(f"--stride {stride} is longer than the window ({window} tokens): tokens would be skipped")
    with torch.inference_mode():  # warm-up: kernels are picked on the first call; keep that out of tok/s
        x = torch.as_tensor(ids[:window], dtype=torch.long)[None].to(lm.device)
        lm.model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    token_nll, windows = sliding_window_nll(lm, ids, window, stride, batch_size, progress)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scored = ~torch.isnan(token_nll)
    context = sum((t - w.begin) for w in windows for t in range(w.first_target, w.end))
    words, n_bytes = count_text(lm.tokenizer, ids)
    return EvalResult(
        model=lm.name, data=data, split=split, n_tokens=int(scored.sum()), n_words=words, n_bytes=n_bytes,
        nll=float(token_nll[scored].sum()), window=window, stride=stride, n_windows=len(windows),
        mean_context=context / int(scored.sum()), complete=complete, dtype=str(lm.dtype).removeprefix("torch."),
        device=str(lm.device), seconds=seconds, forward_tokens=sum(w.end - w.begin for w in windows),
        token_nll=token_nll if keep_token_nll else None,
    )


def fmt_ppl(x: float) -> str:
    """2 decimals, or 3 significant digits for the huge perplexities of untrained models."""
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def format_table(results: list[EvalResult]) -> str:
    """A Markdown table, one row per model."""
    head = ("model", "tokens", "perplexity", "word ppl", "bits/byte", "window/stride", "mean ctx", "dtype", "tok/s")
    rows = [
        (r.model, f"{r.n_tokens:,}" + ("" if r.complete else " (partial)"), fmt_ppl(r.perplexity),
         fmt_ppl(r.word_perplexity), f"{r.bits_per_byte:.4f}", f"{r.window}/{r.stride}", f"{r.mean_context:.0f}",
         r.dtype, f"{r.tokens_per_s:,.0f}")
        for r in results
    ]
    return markdown_table(head, rows)


def load_eval_stream(s: EvalSettings, tokenizer, progress: bool = False) -> tuple[np.ndarray, str]:
    """The split's token stream (data.py: articles tokenized whole, EOS after each), with EOS
    prepended so the first article's first token is scored too, as lm-evaluation-harness's
    rolling windows prefix each document with EOT. Returns (ids, description of the data)."""
    from .data import DataSettings, load_split, resolve_source

    explicit = {"test_file": s.test_file, "validation_file": s.validation_file}
    values: dict = {k: v for k, v in explicit.items() if v}
    if not values or "data" in s.model_fields_set:
        values["data"] = s.data
    data = DataSettings(**values, cache_dir=s.cache_dir, validation_split_percent=0)
    source = resolve_source(data, need=s.split)
    stream = load_split(source, s.split, tokenizer, cache_dir=s.cache_dir, progress=progress)
    ids = np.asarray(stream, dtype=np.int64)
    eos = tokenizer.eos_token_id
    if len(ids) and ids[0] != eos:
        ids = np.concatenate([[eos], ids])
    return ids, source.name


def _tokenizer_key(lm: LoadedModel) -> str:
    tok = lm.tokenizer
    return tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else lm.name


def run(s: EvalSettings) -> int:
    """`wikigpt evaluate`: evaluate each --model on the same stream, print one table (or JSON)."""
    from .modeling import load_model, resolve_device
    from .quantize import quantize_model
    from .settings import ModelSettings

    if s.quantization != "none" and resolve_device(s.device).type != "cpu":
        raise ConfigError("--quantization int8 runs on CPUs only (pass --device cpu)")
    # int8 products take float32 activations (quantize.py); a full-precision row beside an int8
    # one is float32 too, so the two differ only by the weights' precision
    dtype = "float32" if s.quantization != "none" else s.dtype
    settings = [ModelSettings(model=m, revision=s.revision, device=s.device, dtype=dtype) for m in s.model]
    variants = {"none": [False], "int8": [True], "both": [False, True]}[s.quantization]
    # Check every model and the data before the first (possibly hour-long) evaluation starts,
    # so a typo in the last --model fails in seconds; one model is held in memory at a time.
    streams: dict[str, tuple[np.ndarray, str]] = {}  # tokenizer definition -> stream
    for ms in settings:
        lm = load_model(ms, "evaluate")
        window = s.window or lm.context_length
        if window > lm.context_length:
            raise ConfigError(f"--window {window} is longer than {ms.model}'s context ({lm.context_length} tokens)")
        if s.stride and s.stride > window:
            raise ConfigError(f"--stride {s.stride} is longer than {ms.model}'s window ({window} tokens); "
                              f"pass --stride {window // 2}")
        key = _tokenizer_key(lm)
        if key not in streams:
            streams[key] = load_eval_stream(s, lm.tokenizer, progress=s.progress)
        preloaded = lm if len(settings) == 1 else None
        del lm
    results: list[EvalResult] = []
    reported: list[str] = []  # the --model each result row belongs to
    for ms in settings:
        for int8 in variants:
            lm, preloaded = preloaded or load_model(ms, "evaluate"), None  # quantizing changes it: used once
            if int8:
                quantize_model(lm.model)
            ids, data_name = streams[_tokenizer_key(lm)]
            result = evaluate_ids(
                lm, ids, data=data_name, split=s.split, window=s.window, stride=s.stride, batch_size=s.batch_size,
                max_tokens=s.max_tokens, progress=s.progress,
            )
            results.append(dataclasses.replace(result, dtype="int8") if int8 else result)
            reported.append(ms.model)
            del lm
    if s.write_report:
        for name, result in zip(reported, results):
            if len(variants) > 1 and result.dtype == "int8":
                continue  # a model's report holds its full-precision row; the int8 one is among `others`
            if Path(name).expanduser().is_dir():
                others = [r for r in results if r is not result]
                path = write_eval_report(Path(name).expanduser(), result, others)
                print(f"wikigpt evaluate: wrote {path}", file=sys.stderr)
    if s.json_output:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        r0 = results[0]
        what = f"{r0.data}, {r0.split} split" + ("" if r0.complete else f", first {s.max_tokens:,} tokens")
        if len({(r.n_words, r.n_bytes) for r in results}) == 1:  # partial runs of different tokenizers differ
            what += f": {r0.n_words:,} words, {r0.n_bytes:,} bytes"
        print(what + "\n")
        print(format_table(results))
    return 0
