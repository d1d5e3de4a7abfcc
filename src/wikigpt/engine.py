"""The serving engine: one model, a bounded queue, one worker thread, continuous batching.

The only serving code that touches torch. `Engine.submit()` (called on the asyncio loop) puts a
request in a bounded queue and returns a `RequestStream`, an async iterator of text pieces. One
worker thread owns the model: at every decoding step it admits waiting requests (prefilled
together, then merged into the running batch's KV cache), advances every running sequence by one
token, samples each row with that request's own parameters and `torch.Generator`, and drops rows
that finished or whose client went away, so a slot frees at once.

Why our own loop and not transformers' continuous batching (`generate_batch` /
`init_continuous_batching`, transformers 5.24): there, `do_sample` and the random generator are
global to the manager (set from one GenerationConfig, seeded once), and per-request logits
processors exist only for processors present in that config, so per-request seeds, greedy and
sampled requests in one batch, and per-request repetition penalty do not fit; its paged-attention
kernels also target GPUs. Here the batch is a plain left-padded DynamicCache: rows have their own
attention mask and position ids; new rows are left-padded to the batch's length and concatenated;
finished rows are removed with index_select; leading columns that are padding in every row are
cropped. Text goes through the same `ContinuationFilter` as `wikigpt generate`, so with the same
settings both print the same continuation (tests/test_engine.py checks greedy equality).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import EngineError, InvalidRequestError, OverloadedError
from .generation import ContinuationFilter
from .modeling import LoadedModel, cpu_bf16_speedup
from .settings import SamplingParams

log = logging.getLogger("wikigpt.engine")

# Most prompt tokens prefilled in one step: bounds how long running streams stall while new
# requests are admitted (prefill of 4,096 tokens of DistilGPT2 ≈ 1 s in bf16 on 2 cores).
MAX_PREFILL_TOKENS = 4096
_ids = itertools.count(1)


@dataclass
class Chunk:
    """A piece of a request's output. The last one has `finish_reason` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generator: torch.Generator
    filter: ContinuationFilter
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # incremental detokenization window (see _detokenize)
    read_offset: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    def push(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class RequestStream:
    """Async iterator over one request's output chunks; `cancel()` frees its batch slot."""

    def __init__(self, req: _Request, engine: Engine) -> None:
        self._req, self._engine = req, engine
        self.prompt_tokens = len(req.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        try:
            while self.finish_reason is None:
                item = await self._req.out.get()
                if isinstance(item, BaseException):
                    raise item
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.completion_tokens = item.completion_tokens
                self.finish_reason = item.finish_reason
                yield item
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def text(self) -> str:
        """The whole continuation (consumes the stream)."""
        return "".join([c.text async for c in self])

    def cancel(self) -> None:
        if not self._req.cancelled:
            self._req.cancelled = True
            self._engine._wake()


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for GROW more tokens.

    DynamicLayer appends each token with torch.cat, copying the whole cache every step: at batch
    32 after 128 tokens in bf16 that is 6 layers x 2 x 32 x 12 heads x 128 x 64 x 2 B = 75 MB
    per step. Here a step writes one column in place and the copy happens once per GROW steps.
    When the batch code replaces `keys`/`values` (rows dropped or merged, dtype cast, cropping),
    they no longer point into the buffer and the next update starts a new one.
    """

    GROW = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = self.keys, self.values
        n, m = (k.shape[-2] if k.numel() else 0), key_states.shape[-2]
        buf = getattr(self, "_buf", None)
        if (buf is None or k.data_ptr() != buf[0].data_ptr() or n + m > buf[0].shape[-2]
                or buf[0].shape[:2] != key_states.shape[:2] or buf[0].dtype != key_states.dtype):
            shape = (*key_states.shape[:2], n + m + self.GROW, key_states.shape[-1])
            buf = self._buf = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                buf[0][:, :, :n], buf[1][:, :, :n] = k, v
        buf[0][:, :, n:n + m], buf[1][:, :, n:n + m] = key_states, value_states
        self.keys, self.values = buf[0][:, :, :n + m], buf[1][:, :, :n + m]
        return self.keys, self.values


def _new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


class _Batch:
    """Running sequences and their shared KV cache (rows left-padded to one length)."""

    def __init__(self, rows: list[_Request], cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor,
                 seen: torch.Tensor, dtype: torch.dtype) -> None:
        self.rows, self.cache, self.mask, self.pos, self.seen, self.dtype = rows, cache, mask, pos, seen, dtype
        self.last: torch.Tensor | None = None  # [B] next input token per row

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.seen = self.mask[idx], self.pos[idx], self.seen[idx]
        self.last = self.last[idx] if self.last is not None else None
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        # Crop leading columns that are padding in every remaining row.
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def cast(self, dtype: torch.dtype) -> None:
        if dtype != self.dtype:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            self.dtype = dtype

    @staticmethod
    def _left_pad(t: torch.Tensor, n: int, dim: int, value=0) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)

    def merge(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        other.cast(self.dtype)
        la, lb = self.mask.shape[1], other.mask.shape[1]
        n = max(la, lb)
        self.mask = torch.cat([self._left_pad(self.mask, n - la, 1), self._left_pad(other.mask, n - lb, 1)])
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([self._left_pad(a.keys, n - la, 2), self._left_pad(b.keys, n - lb, 2)])
            a.values = torch.cat([self._left_pad(a.values, n - la, 2), self._left_pad(b.values, n - lb, 2)])
        sa, sb = self.seen.shape[1], other.seen.shape[1]
        m = max(sa, sb)  # `seen` is padded with each row's own first token: a no-op for the penalty
        self.seen = torch.cat([
            torch.cat([self.seen[:, :1].expand(-1, m - sa), self.seen], 1),
            torch.cat([other.seen[:, :1].expand(-1, m - sb), other.seen], 1),
        ])
        self.pos = torch.cat([self.pos, other.pos])
        self.last = None  # set for all rows once they are sampled
        self.rows += other.rows


class Engine:
    """Continuous-batching generation on one model, driven by one worker thread.

    dtype per batch size (CPU, `bf16_from_batch` > 0, and only where the start-up probe finds
    bf16 matmuls faster, see modeling.cpu_bf16_speedup): a bfloat16 copy of the weights serves
    batches of at least that many rows and the float32 weights serve smaller ones, the KV cache
    being cast when the batch crosses the line. Measured on the 2-core Xeon (AMX), DistilGPT2
    shape: decoding one sequence is bound by reading the weights (330 MB/token in fp32 at
    ~27 GB/s) and fp32 is faster (~60 vs ~55 tok/s: bf16 saves bytes but pays conversions);
    from batch 8 up the matmuls dominate and AMX bf16 is ~2x faster (batch 32: ~970 vs ~520
    tok/s). (Those figures are the project's measurements with `generate` on a quiet 2-core
    Xeon.) Casting the cache costs one copy of it: batch 8 x 128 tokens is 6 layers x 2 x 8 x
    128 x 768 x 4 B = 38 MB, a few ms at memory speed (34 ms measured on a busy AVX2-only box,
    where bf16 is never chosen), paid once per crossing thanks to the hysteresis in _dtype_for.
    """

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 32, queue_size: int = 256,
                 bf16_from_batch: int = 0, check_bf16_speed: bool = True, on_step=None) -> None:
        self.lm = lm
        self.tokenizer = lm.tokenizer  # used by the worker thread only (decoding)
        # The Rust decoder directly: transformers' decode wrapper costs ~3x more per call, and
        # the worker decodes twice per row per step. Its only extra, space clean-up, is off for
        # GPT-2 (clean_up_tokenization_spaces=false); keep the wrapper where it is on.
        backend = getattr(lm.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(lm.tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)
        # The asyncio thread encodes prompts with its own copy: a fast tokenizer shared across
        # threads can fail with "Already borrowed" when one thread touches its padding state.
        self._encoder = copy.deepcopy(lm.tokenizer)
        self.models = {lm.dtype: lm.model}
        self.bf16_from_batch = 0
        if bf16_from_batch > 0 and lm.device.type == "cpu" and lm.dtype == torch.float32:
            speedup = cpu_bf16_speedup() if check_bf16_speed else float("inf")
            if check_bf16_speed:
                log.info("matmul probe: bfloat16 %.2fx the speed of float32: %s", speedup,
                         "bf16 for big batches" if speedup >= 1.25 else "float32 only")
            if speedup >= 1.25:  # only where the CPU has bf16 units (AMX, AVX512-BF16)
                self.models[torch.bfloat16] = copy.deepcopy(lm.model).to(torch.bfloat16).eval()
                self.bf16_from_batch = bf16_from_batch
        self.max_batch_size, self.queue_size = max_batch_size, queue_size
        self.context_length = lm.context_length
        self.vocab_size = int(lm.model.config.vocab_size)
        self.eos_id = lm.tokenizer.eos_token_id
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.on_step = on_step
        self.ready = threading.Event()
        self.tokens_generated = 0
        self.steps = 0
        self._waiting: deque[_Request] = deque()
        self._batch: _Batch | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- asyncio side -------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        b = self._batch
        return len(b.rows) if b is not None else 0

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def submit(self, prompt: str | list[int], params: SamplingParams, *, ignore_eos: bool = False,
               max_tokens_name: str = "max_new_tokens") -> RequestStream:
        """Queue a request (call on the event loop). Raises OverloadedError when the queue is full."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty: send at least one token of text", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})", param="prompt")
        n, ctx = len(ids), self.context_length
        if n + params.max_new_tokens > ctx:
            fixes = []
            if params.max_new_tokens < ctx:
                fixes.append(f"shorten the prompt to at most {ctx - params.max_new_tokens} tokens")
            if n < ctx:
                fixes.append(f"lower {max_tokens_name} to at most {ctx - n}")
            raise InvalidRequestError(
                f"the prompt has {n} tokens and {max_tokens_name} is {params.max_new_tokens}: together "
                f"they exceed the model's context of {ctx} tokens; " + (" or ".join(fixes) or "shorten the prompt"),
                param="prompt")
        gen = torch.Generator(device=self.lm.device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = _Request(next(_ids), ids, params, ignore_eos, asyncio.get_running_loop(), asyncio.Queue(),
                       gen, ContinuationFilter(params.stop))
        with self._cond:
            if self._stopping:
                raise OverloadedError("the server is shutting down", retry_after=5)
            if len(self._waiting) >= self.queue_size:
                raise OverloadedError(
                    f"the server is busy: {len(self._waiting)} requests are already waiting "
                    f"(queue size {self.queue_size}); retry shortly")
            self._waiting.append(req)
            self._cond.notify()
        return RequestStream(req, self)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wikigpt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        rows = list(self._waiting) + (self._batch.rows if self._batch else [])
        for r in rows:
            r.push(OverloadedError("the server is shutting down", retry_after=5))
        self._waiting.clear()
        self._batch = None

    def _warm_up(self) -> None:
        """One short prefill and decode per dtype, so the first request does not pay for
        oneDNN kernel selection and allocator growth."""
        for dtype, model in self.models.items():
            ids = torch.tensor([[self.eos_id] * 4], device=self.lm.device)
            mask = torch.ones(1, 5, dtype=torch.long, device=self.lm.device)
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, attention_mask=mask[:, :4], cache=cache, use_cache=True, logits_to_keep=1)
            model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask, cache=cache,
                  use_cache=True)
            log.debug("warmed up %s", dtype)

    # ---- worker side --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self._warm_up()
            except Exception:  # a broken model fails the requests below with a clear error
                log.exception("warm-up failed")
            self.ready.set()
            while True:
                new = self._admit()
                if new is None:
                    return
                try:
                    self._step(new)
                except Exception:
                    log.exception("decoding step failed; dropping the batch")
                    rows = {r.id: r for r in (self._batch.rows if self._batch else []) + new}
                    for r in rows.values():
                        r.push(EngineError("internal error while generating; the request was dropped"))
                    self._batch = None

    def _admit(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if any(r.cancelled for r in self._waiting):
                    self._waiting = deque(r for r in self._waiting if not r.cancelled)
                if self._waiting or self._batch is not None:
                    break
                self._cond.wait()
            free = self.max_batch_size - self.batch_size
            new: list[_Request] = []
            budget = MAX_PREFILL_TOKENS
            while self._waiting and len(new) < free:
                n = len(self._waiting[0].prompt_ids)
                if new and n > budget:
                    break
                new.append(self._waiting.popleft())
                budget -= n
            return new

    def _dtype_for(self, batch_size: int, current: torch.dtype | None) -> torch.dtype:
        """bf16 from `bf16_from_batch` rows up; back to fp32 only below half of that, so a batch
        hovering around the line does not pay for a cache cast at every step."""
        n = self.bf16_from_batch
        if n and (batch_size >= n or (current == torch.bfloat16 and batch_size >= max(1, n // 2))):
            return torch.bfloat16
        return self.lm.dtype

    def _step(self, new: list[_Request]) -> None:
        t0 = time.perf_counter()
        b = self._batch
        if b is not None and any(r.cancelled for r in b.rows):
            keep = [i for i, r in enumerate(b.rows) if not r.cancelled]
            if keep:
                b.select(keep)
            else:
                b = self._batch = None
        if b is None and not new:
            return
        dtype = self._dtype_for((len(b.rows) if b else 0) + len(new), b.dtype if b else None)
        logits = []
        if b is not None:
            b.cast(dtype)
            b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], 1)
            out = self.models[dtype](input_ids=b.last[:, None], attention_mask=b.mask,
                                     position_ids=b.pos[:, None], cache=b.cache, use_cache=True)
            b.pos = b.pos + 1
            logits.append(out.logits[:, -1])
        if new:
            nb, lg = self._prefill(new, dtype)
            logits.append(lg)
            if b is None:
                b = nb
            else:
                b.merge(nb)
        self._batch = b
        nxt = self._sample(b.rows, b.seen, torch.cat(logits).float())
        b.last = nxt
        b.seen = torch.cat([b.seen, nxt[:, None]], 1)
        keep = [i for i, (r, t) in enumerate(zip(b.rows, nxt.tolist())) if self._advance(r, t)]
        n_rows = len(b.rows)
        if not keep:
            self._batch = None
        elif len(keep) < n_rows:
            b.select(keep)
        self.tokens_generated += n_rows
        self.steps += 1
        if self.on_step is not None:
            self.on_step(n_rows, sum(len(r.prompt_ids) for r in new), time.perf_counter() - t0)

    def _prefill(self, reqs: list[_Request], dtype: torch.dtype) -> tuple[_Batch, torch.Tensor]:
        n, width = len(reqs), max(len(r.prompt_ids) for r in reqs)
        dev = self.lm.device
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        model = self.models[dtype]
        cache = _new_cache(model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        first = ids.gather(1, (width - mask.sum(1, keepdim=True)))
        seen = torch.where(mask.bool(), ids, first)
        return _Batch(list(reqs), cache, mask, mask.sum(1), seen, dtype), out.logits[:, -1]

    def _sample(self, rows: list[_Request], seen: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row, each with its own parameters, vectorised over the batch.

        Same order as transformers' processors: repetition penalty, temperature, top-k, top-p.
        Sampling uses the exponential race (argmax of p / E with E ~ Exp(1) drawn from the row's
        own generator), which draws exactly from p and lets every row keep its own seed.
        """
        dev = logits.device
        pen = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)
        if bool((pen != 1.0).any()):
            sc = logits.gather(1, seen)
            sc = torch.where(sc < 0, sc * pen[:, None], sc / pen[:, None])
            logits.scatter_(1, seen, sc)
        out = torch.empty(len(rows), dtype=torch.long, device=dev)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            out[greedy] = logits[greedy].argmax(-1)
        if sampled:
            ps = [rows[i].params for i in sampled]
            temp = torch.tensor([p.temperature for p in ps], device=dev)
            vocab = logits.shape[1]
            ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
            k = max(ks)
            scaled = logits[sampled] / temp[:, None]
            vals, idx = torch.topk(scaled, k) if k < vocab else torch.sort(scaled, descending=True)
            rank = torch.arange(k, device=dev)[None]
            vals = vals.masked_fill(rank >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
            probs = vals.softmax(-1)
            top_p = torch.tensor([p.top_p for p in ps], device=dev)
            if bool((top_p < 1.0).any()):  # drop tokens once the more likely ones reach top_p
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
            noise = torch.stack([torch.empty(k, device=dev).exponential_(generator=rows[i].generator)
                                 for i in sampled])
            out[sampled] = idx.gather(1, (probs / noise).argmax(-1, keepdim=True)).squeeze(1)
        return out

    def _advance(self, r: _Request, token: int) -> bool:
        """Record one sampled token; emit text; return False when the request left the batch."""
        if r.cancelled:
            return False
        if token == self.eos_id and not r.ignore_eos:
            self._finish(r, "stop", self._detokenize(r, final=True))
            return False
        r.tokens.append(token)
        text = r.filter.feed(self._detokenize(r))
        if r.filter.done:
            r.push(Chunk(text, "stop", len(r.prompt_ids), len(r.tokens)))
            return False
        if len(r.tokens) >= r.params.max_new_tokens:
            self._finish(r, "length", text + self._detokenize(r, final=True))
            return False
        if text:
            r.push(Chunk(text, None, len(r.prompt_ids), len(r.tokens)))
        return True

    def _finish(self, r: _Request, reason: str, raw_tail: str) -> None:
        text = r.filter.feed(raw_tail) if raw_tail else ""
        if not r.filter.done:
            text += r.filter.finish()
        r.push(Chunk(text, reason, len(r.prompt_ids), len(r.tokens)))

    def _detokenize(self, r: _Request, final: bool = False) -> str:
        """New text since the last call, decoding only a short window of tokens (as vLLM does):
        decode(tokens[prefix:]) minus decode(tokens[prefix:read]); held back while it ends in
        an incomplete UTF-8 character (U+FFFD), unless this is the end."""
        before = self._decode(r.tokens[r.prefix_offset:r.read_offset])
        now = self._decode(r.tokens[r.prefix_offset:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            r.prefix_offset, r.read_offset = r.read_offset, len(r.tokens)
            return now[len(before):]
        return ""
