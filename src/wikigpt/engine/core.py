"""The engine: a bounded queue, one worker thread that owns the model, continuous batching.

`Engine.submit()` (called on the asyncio loop) checks and queues a request and returns a
`RequestStream`, an async iterator of `Chunk`s. The worker thread, at every step, drops rows
whose client went away, admits waiting requests into free slots (their prompts prefilled
together), decodes one token for every running row, samples each row with its own
parameters and generator, and streams each row's new text through its `Detokenizer`.

Why our own loop and not transformers' continuous batching (`generate_batch`): there
`do_sample` and the random generator are global to the manager, so per-request seeds and
greedy and sampled requests in one batch do not fit, and its paged-attention kernels target
GPUs.
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

import torch

from ..api.chat import render as render_chat
from ..decoding import SamplingParams
from ..errors import EngineError, InvalidRequestError, OverloadedError, ShuttingDownError
from ..modeling import LoadedModel
from ..outputs import Backlog, ServedModel
from .builder import Forward, build
from .detokenizer import Chunk, Detokenizer, token_logprobs
from .kv_cache import common_prefix
from .request import Request, RequestStream, deliver
from .sampling import RowSampling, sample

log = logging.getLogger("wikigpt.engine")

# Most prompt tokens prefilled in one step: bounds how long running streams stall while new
# requests are admitted (4,096 tokens of DistilGPT2 = 0.7 TFLOP, about a second on 2 cores).
MAX_PREFILL_TOKENS = 4096
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's completions API allows
SHARED_PREFIX = 32  # tokens two prompts of one batch must share for the second to wait for the first
_ids = itertools.count(1)


class Engine:
    """Continuous-batching generation on one model in one dtype, driven by one worker thread.

    GPT-2-family models run on the lean forward (gpt2.py) with a slot-indexed KV cache; other
    causal LMs on transformers' forward (hf.py). `dtype` (default: the loaded model's) is what
    the weights and cache are served in; "auto" takes bf16 where this CPU measures it faster.
    `compile` lets the start-up measurement try torch.compile'd kernels (kernels.py).

    Every torch operation, start-up probes included, runs on the worker thread: OpenMP keeps a
    pool of threads per thread that starts parallel work, and a second pool left by the main
    thread competes with the worker's for the same cores.
    """

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 32, queue_size: int = 256,
                 dtype: torch.dtype | str | None = None, compile: bool = False,
                 stream_backlog: int = 256, quantization: str = "none", prefix_caching: bool = True) -> None:
        self.lm = lm
        self.prefix_caching = prefix_caching  # off where the forward cannot extend a slot (_build)
        # "auto" is settled by the worker, in _build; a named --dtype is the loaded model's
        self.dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else lm.dtype
        self.compile = compile
        if quantization not in {"auto", "none", "int8"}:
            raise ValueError(f"quantization must be auto, none or int8, not {quantization!r}")
        self.quantization = quantization  # "auto" is settled by the worker, in _build
        self.int8_timing: str | None = None  # what the "auto" measurement found
        # The Rust decoder directly: transformers' decode wrapper costs ~3x more per call. Its
        # only extra, space clean-up, is off for GPT-2; keep the wrapper where it is on.
        backend = getattr(lm.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(lm.tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)
        # The asyncio thread encodes prompts with its own copy: a fast tokenizer shared across
        # threads can fail with "Already borrowed".
        self._encoder = copy.deepcopy(lm.tokenizer)
        self.max_batch_size, self.queue_size, self.stream_backlog = max_batch_size, queue_size, stream_backlog
        self.context_length = lm.context_length
        self.vocab_size = int(lm.model.config.vocab_size)
        self.eos_id = lm.tokenizer.eos_token_id
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self._observer = None  # api.engine_client.Observer: told of every step
        self.ready = threading.Event()
        self.not_ready_reason = "the model is still loading"
        self.tokens_generated = 0
        self.steps = 0
        self.forward: Forward | None = None  # built by the worker (builder.py)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._history: torch.Tensor | None = None  # [slots, context] ids, for the repetition penalty
        self._outbox: list[tuple[Request, Chunk]] = []  # this step's chunks, handed over at its end
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- asyncio side -------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def stats(self) -> dict:
        return {"queue_depth": self.queue_depth, "running": self.batch_size}

    def observe(self, observer) -> None:
        self._observer = observer

    def model(self) -> ServedModel:
        return ServedModel(self.lm.name, self.lm.name, self.lm.n_params, self.context_length, self.max_batch_size)

    def render_chat(self, messages: list[dict]) -> tuple[str, list[str]]:
        return render_chat(messages, self._encoder)

    def decode_prompt(self, ids: list[int]) -> str:
        return self._encoder.decode(ids)

    def info(self) -> dict:
        """Facts for the API's `/` route and the logs."""
        kernels = self.forward.describe() if self.forward is not None else None
        if kernels and self.int8_timing:
            kernels += f"; {self.int8_timing}"
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.lm.device),
                "quantization": self.quantization, "forward": type(self.forward).__name__ if self.forward else None,
                "kernels": kernels, "prefix_caching": self.prefix_caching}

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    async def tokenize(self, text: str, add_special_tokens: bool = True,
                       with_strings: bool = False) -> tuple[list[int], list[str] | None]:
        ids = self._encoder.encode(text, add_special_tokens=add_special_tokens)
        return ids, self._encoder.convert_ids_to_tokens(ids) if with_strings else None

    async def detokenize(self, ids: list[int]) -> str:
        self._check_ids(ids, "tokens")
        return self._encoder.decode(ids)

    def submit(self, prompt: str | list[int], params: SamplingParams, *, ignore_eos: bool = False,
               logprobs: int | None = None, echo: bool = False,
               score_only: bool = False, stream: bool = True) -> RequestStream:
        """Queue a request (call on the event loop). Raises OverloadedError when the queue is full.
        `stream` changes nothing here: chunks are made per step either way.

        `logprobs=N` scores each generated token with its N best alternatives; `echo` scores the
        prompt too (only these requests pay for logits at every prompt position); `score_only`
        generates nothing: one chunk with the prompt's scores."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        if score_only:
            params = params.model_copy(update={"max_new_tokens": 1})  # the context check below
        self._check(ids, params)
        gen = torch.Generator(device=self.lm.device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = Request(next(_ids), ids, params, ignore_eos, asyncio.get_running_loop(), Backlog(self.stream_backlog),
                       Detokenizer(self._decode, params.stop, len(ids)), RowSampling(params, gen),
                       logprobs=0 if score_only and logprobs is None else logprobs,
                       echo=score_only or (echo and logprobs is not None), score_only=score_only)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down", retry_after=5)
            if len(self._waiting) >= self.queue_size:
                raise OverloadedError(
                    f"the server is busy: {len(self._waiting)} requests are already waiting "
                    f"(queue size {self.queue_size}); retry shortly")
            self._waiting.append(req)
            self._cond.notify()
        return RequestStream(req, self._wake)

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        """Refusals in OpenAI's terms (`max_tokens`, as vLLM words them); /predict rewords its own."""
        if not ids:
            raise InvalidRequestError("the prompt is empty: send at least one token of text", param="prompt")
        self._check_ids(ids, "prompt")
        n, ctx = len(ids), self.context_length
        if n + params.max_new_tokens > ctx:
            fixes = []
            if params.max_new_tokens < ctx:
                fixes.append(f"shorten the prompt to at most {ctx - params.max_new_tokens} tokens")
            if n < ctx:
                fixes.append(f"lower max_tokens to at most {ctx - n}")
            raise InvalidRequestError(
                f"the prompt has {n} tokens and max_tokens is {params.max_new_tokens}: together "
                f"they exceed the model's context of {ctx} tokens; " + (" or ".join(fixes) or "shorten the prompt"),
                param="prompt")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if bad := [t for t in ids if not 0 <= t < self.vocab_size]:
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size}); got {bad[0]}", param=param)

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
        for r in list(self._waiting) + self._running:
            r.push(ShuttingDownError("the server is shutting down: the request was ended before it finished",
                                     retry_after=5))
        self._waiting.clear()
        self._running = []

    def _build(self) -> None:
        """Build the forward (builder.py), then warm up."""
        built = build(self.lm, dtype=self.dtype, quantization=self.quantization, compile=self.compile,
                      slots=self.max_batch_size, context_length=self.context_length, eos_id=self.eos_id,
                      pad_id=self.pad_id)
        self.dtype, self.quantization, self.int8_timing = built.dtype, built.quantization, built.int8_timing
        self._history = torch.zeros(self.max_batch_size, self.context_length, dtype=torch.long, device=self.lm.device)
        self.forward = built.forward
        self.prefix_caching = self.prefix_caching and hasattr(self.forward, "allocate_for")
        self._warm_up()
        log.info("engine: %s", self.info())

    def _warm_up(self) -> None:
        """One prefill and one decoding step, so the first request does not pay for kernel
        selection and allocator growth."""
        slot = self.forward.allocate()
        self.forward.prefill([slot], [[self.eos_id] * 4])
        self.forward.decode([slot], torch.tensor([self.eos_id], device=self.lm.device))
        self.forward.release([slot])
        if self.prefix_caching:
            self.forward.cache.forget()  # the warm-up's prompt is nobody's

    # ---- worker side --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            try:
                self._build()
            except Exception:  # every request below then fails with a clear error
                log.exception("building the engine failed")
                self.forward = None  # a half-built engine (forward set, history not) serves nothing
            self.ready.set()
            while True:
                new = self._admit()
                if new is None:
                    return
                try:
                    if self.forward is None:
                        raise EngineError("the model could not be prepared for serving; see the server log")
                    self._step(new)
                    self._flush()
                except Exception as exc:
                    log.exception("decoding step failed; dropping the batch")
                    # a typed error's message is written for users; anything else stays in the log
                    self._fail(self._running + new, exc if isinstance(exc, EngineError) else None)

    def _emit(self, r: Request, chunk: Chunk) -> None:
        self._outbox.append((r, chunk))

    def _flush(self) -> None:
        """Hand this step's chunks to the event loop in one call: one wake-up per step instead
        of one per row keeps the loop thread off the cores the next step computes on."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for r, chunk in self._outbox:
            by_loop.setdefault(r.loop, []).append((r, chunk))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for r, _ in items:
                    r.cancelled = True

    def _fail(self, rows: list[Request], error: EngineError | None = None) -> None:
        self._flush()
        for r in {r.id: r for r in rows}.values():
            r.push(error or EngineError("internal error while generating; the request was dropped"))
        if self.forward is not None:
            self._release([r for r in {r.id: r for r in rows}.values() if r.slot >= 0])
        self._running = []

    def _admit(self) -> list[Request] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if any(r.cancelled for r in self._waiting):
                    self._waiting = deque(r for r in self._waiting if not r.cancelled)
                if self._waiting or self._running:
                    break
                self._cond.wait()
            free = self.max_batch_size - len(self._running)
            new: list[Request] = []
            budget = MAX_PREFILL_TOKENS
            while self._waiting and len(new) < free:
                n = len(self._waiting[0].prompt_ids)
                if new and n > budget:
                    break
                new.append(self._waiting.popleft())
                budget -= n
            return new

    def _step(self, new: list[Request]) -> None:
        """One decoding step: every running row advances one token, new rows are prefilled."""
        t0 = time.perf_counter()
        gone = [r for r in self._running if r.cancelled]
        if gone:
            self._release(gone)
            self._running = [r for r in self._running if not r.cancelled]
        running, dev = self._running, self.lm.device
        if not running and not new:
            return
        logits = []
        if running:
            last = torch.tensor([r.last for r in running], device=dev)
            logits.append(self.forward.decode([r.slot for r in running], last))
        if new:
            new, first = self._prefill(new)
            logits.append(first)
        rows, logits = running + new, logits[0] if len(logits) == 1 else torch.cat(logits)
        scored_only = [r for r in new if r.score_only]
        if scored_only:  # prompt scores are all they asked for: done before any sampling
            for r in scored_only:
                self._emit(r, r.output.chunk("", "length"))
            self._release(scored_only)
            keep = [i for i, r in enumerate(rows) if not r.score_only]
            rows, logits = [rows[i] for i in keep], logits[keep]
            if not rows:
                return
        tokens = self._sample(rows, logits)
        self._running = [r for r, t in zip(rows, tokens) if self._advance(r, t)]
        done = [r for r in rows if r not in self._running]
        if done:
            self._release(done)
        self.tokens_generated += len(rows)
        self.steps += 1
        if self._observer is not None:
            self._observer.on_step(len(rows), sum(len(r.prompt_ids) for r in new), time.perf_counter() - t0)

    def _release(self, rows: list[Request]) -> None:
        """Free the rows' slots; with prefix caching each slot remembers the ids it holds."""
        slots = [r.slot for r in rows]
        if self.prefix_caching:
            self.forward.release(slots, [r.prompt_ids + r.output.tokens for r in rows])
        else:
            self.forward.release(slots)

    def _prefill(self, new: list[Request]) -> tuple[list[Request], torch.Tensor]:
        """Give new requests a slot and prefill them: plain ones keep the last position's
        logits only, those that asked for prompt scores keep every position's. With prefix
        caching each starts from the longest prefix a slot holds; prompts of this batch that
        share a prefix with an earlier one (n > 1 choices, one context with several
        continuations) wait for a second pass, which finds it cached."""
        first, done = [], []
        for wave in self._waves(new):
            plain, echo = [r for r in wave if not r.echo], [r for r in wave if r.echo]
            if plain:
                self._allocate(plain)
                first.append(self.forward.prefill([r.slot for r in plain], [r.prompt_ids for r in plain]))
            if echo:
                self._allocate(echo)
                every = self.forward.prefill([r.slot for r in echo], [r.prompt_ids for r in echo], every_position=True)
                for r, logits in zip(echo, every):
                    self._score_prompt(r, logits)
                first.append(torch.stack([logits[-1] for logits in every]))
            done += plain + echo
        return done, torch.cat(first)

    def _waves(self, new: list[Request]) -> list[list[Request]]:
        """[new] without prefix caching; else the requests sharing at least SHARED_PREFIX tokens
        with an earlier one of the batch go in a second wave (a second pass costs one more call
        per layer, ~1 ms; 32 shared positions of DistilGPT2 cost ~10 ms to compute)."""
        if not self.prefix_caching or len(new) < 2:
            return [new]
        firsts, later = [], []
        for r in new:
            shares = any(common_prefix(f.prompt_ids, r.prompt_ids) >= SHARED_PREFIX for f in firsts)
            (later if shares else firsts).append(r)
        return [firsts, later] if later else [firsts]

    def _allocate(self, rows: list[Request]) -> None:
        """A slot per request and, with prefix caching, the longest prefix found of its prompt
        but the last token (whose logits give the first sample). A scoring request keeps a cached
        position only where the cache also holds the score of the token after it."""
        cache = getattr(self.forward, "cache", None)
        for r in rows:
            if self.prefix_caching:
                r.slot, n = self.forward.allocate_for(r.prompt_ids[:-1])
                if r.echo:  # positions 0 .. n-1 kept need the scores of tokens 1 .. n
                    k, scores = cache.scores[r.slot] or (None, [])
                    n = min(n - 1, len(scores)) if k == r.logprobs and n > 1 else 0
                    cache.truncate(r.slot, n)
                r.output.cached_tokens = n
            else:
                r.slot = self.forward.allocate()
            self._history[r.slot] = r.prompt_ids[0]  # padding that is a no-op for the penalty
            self._history[r.slot, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)

    def _score_prompt(self, r: Request, logits: torch.Tensor) -> None:
        """Prompt scores from the logits of the computed positions n .. len-1 (row i scores
        token n + i + 1) after the n cached ones' remembered scores."""
        n = r.output.cached_tokens
        cached = self.forward.cache.scores[r.slot][1][:n] if n else []
        scores = token_logprobs(self._decode, logits[:-1].log_softmax(-1), r.prompt_ids[n + 1:], r.logprobs)
        r.output.prompt_logprobs = [None, *cached, *scores]  # the first token has no context to score
        if self.prefix_caching:
            self.forward.cache.remember(r.slot, r.prompt_ids, (r.logprobs, r.output.prompt_logprobs[1:]))

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        slots = torch.tensor([r.slot for r in rows], device=logits.device)
        lengths = [len(r.prompt_ids) + len(r.output.tokens) for r in rows]
        # the history is read only for the penalty, and a row's penalty is fixed for its life: a
        # step without one needs neither the read nor the write (the rows of a penalised batch
        # that have none divide by 1.0, whatever their history holds)
        penalised = any(r.params.repetition_penalty != 1.0 for r in rows)
        seen = self._history[slots, :max(lengths)] if penalised else None
        scored = [i for i, r in enumerate(rows) if r.logprobs is not None]
        raw = logits[scored].log_softmax(-1) if scored else None  # before sample() edits logits
        tokens = sample(logits, [r.sampling for r in rows], seen)
        if penalised:
            self._history[slots, torch.tensor(lengths, device=logits.device)] = tokens
        ids = tokens.tolist()
        for j, i in enumerate(scored):
            rows[i].output.pending += token_logprobs(self._decode, raw[j:j + 1], [ids[i]], rows[i].logprobs)
        return ids

    def _advance(self, r: Request, token: int) -> bool:
        """Record one sampled token and stream its text; False when the request is over."""
        if r.cancelled:
            return False
        out = r.output
        if token == self.eos_id and not r.ignore_eos:  # its score stays (lm-eval reads it), its text is ""
            self._emit(r, out.chunk(out.finish(), "stop"))
            return False
        text = out.append(token)
        if out.stopped:
            self._emit(r, out.chunk(text, "stop"))
            return False
        if len(out.tokens) >= r.params.max_new_tokens:
            self._emit(r, out.chunk(text + out.finish(), "length"))
            return False
        if text:
            self._emit(r, out.chunk(text))
        r.last = token
        return True
