"""The forward the scheduler drives, built once at start-up: which forward (the lean GPT-2 one or
transformers'), in what dtype, with which kernels and weights (full precision or int8), each
chosen by a measurement on this machine. The scheduler (core.py) only schedules; it sees a
`Forward`, which describes itself.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import EngineError
from ..modeling import LoadedModel, auto_dtype
from ..quantize import quantize_model
from ..quantize import unavailable as quantize_unavailable
from ..timing import best_times
from .gpt2 import GPT2Forward, SplitForward, padded_head, unsupported_reason
from .hf import HFForward
from .kernels import Kernels, choose_kernels
from .kv_cache import SlotKVCache

log = logging.getLogger("wikigpt.engine")


class Forward(Protocol):
    """A model's forward over its own cache of `slots` sequences."""

    cache: Any  # a SlotKVCache where the forward supports prefix caching (`allocate_for`)

    def allocate(self) -> int: ...

    def release(self, slots: list[int], held: list[list[int]] | None = None) -> None:
        """Free the slots; `held`: the ids each one holds, which a prefix cache remembers."""

    def prefill(self, slots: list[int], prompts: list[list[int]], every_position: bool = False) -> Any: ...

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str | None:
        """The kernels it runs, for `/` and the logs (None: transformers' own)."""


@dataclass
class Built:
    forward: Forward
    dtype: torch.dtype
    quantization: str  # "int8" or "none", as served
    int8_timing: str | None  # what the "auto" measurement found


def build(lm: LoadedModel, *, dtype: torch.dtype | str, quantization: str, compile: bool, slots: int,
          context_length: int, eos_id: int, pad_id: int) -> Built:
    """The forward for `lm`: `dtype` "auto" is auto_dtype's serving choice; `quantization`
    "auto" serves int8 weights where they measure faster (int8_rows)."""
    model = lm.model
    if dtype == "auto":
        dtype = auto_dtype(lm.device, "serve")
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("transformers forward (%s)", reason)
        if quantization == "int8":  # asked for: every linear layer int8, activations float32
            _require_int8(lm)
            dtype = torch.float32
            model = quantize_model(copy.deepcopy(model).float().eval())
        elif dtype != lm.dtype:
            model = copy.deepcopy(model).to(dtype).eval()
        # "auto" is not measured on this forward: full precision
        return Built(HFForward(model, slots, pad_id), dtype, "int8" if quantization == "int8" else "none", None)
    head = padded_head(model.get_output_embeddings().weight.detach().to(dtype))
    cfg = model.config
    kernels = choose_kernels(head, compile=compile, batch=slots, heads=cfg.n_head,
                             head_dim=cfg.n_embd // cfg.n_head, context=context_length)
    cache = SlotKVCache(cfg.n_layer, slots, cfg.n_head, context_length, cfg.n_embd // cfg.n_head, dtype, lm.device)
    full = GPT2Forward(model, cache, dtype, kernels)
    if quantization == "none":
        return Built(full, dtype, "none", None)
    if quantization == "auto" and (why := _int8_unavailable(lm)):
        log.info("int8 weights not tried: %s", why)
        return Built(full, dtype, "none", None)
    _require_int8(lm)
    int8 = GPT2Forward(model, cache, dtype, Kernels(int8=True, attention=kernels.attention))
    if quantization == "int8":
        return Built(int8, dtype, "int8", None)
    rows, timing = int8_rows(full, int8, cache, slots, eos_id)
    if rows == 0:
        return Built(full, dtype, "none", timing)
    return Built(int8 if rows >= slots else SplitForward(int8, full, rows), dtype, "int8", timing)


def int8_rows(full: GPT2Forward, int8: GPT2Forward, cache: SlotKVCache, slots: int, eos_id: int) -> tuple[int, str]:
    """The most rows at which int8's decoding step was faster (0: not even at one row), and
    the timings. Both forwards are timed side by side at 1, 2, 4, ... rows up to `slots`; int8
    then serves steps up to the largest row count where it won (one sequence first: a chat or
    the web UI). Where full precision won at more rows, its weights stay loaded beside the int8
    ones (DistilGPT2: 81 MB more than int8 alone's ~330 MB of weights in bf16 and packed copies)
    and serve those steps and every prefill."""
    token, won, found = torch.tensor([eos_id], device=cache.kv.device), 0, []
    for n in sorted({min(2 ** i, slots) for i in range(slots.bit_length() + 1)}):
        held = [cache.allocate() for _ in range(n)]
        try:
            full.prefill(held, [[eos_id] * 4] * n)
            tokens = token.expand(n)
            full_s, int8_s = best_times(lambda: full.decode(held, tokens), lambda: int8.decode(held, tokens),
                                        seconds=0.5, runs=10)
        finally:
            for s in held:
                cache.release(s)
        found.append(f"{n} {int8_s * 1e3:.2f}/{full_s * 1e3:.2f}")
        if int8_s >= full_s:
            break
        won = n
    timing = f"decoding step, rows int8/{str(full.dtype).removeprefix('torch.')} ms: {', '.join(found)}"
    log.info("%s: int8 serves steps of up to %d rows", timing, won)
    return won, timing


def _int8_unavailable(lm: LoadedModel) -> str | None:
    """Why int8 weights cannot be served here, or None."""
    return "int8 weights run on CPUs only" if lm.device.type != "cpu" else quantize_unavailable()


def _require_int8(lm: LoadedModel) -> None:
    if why := _int8_unavailable(lm):
        raise EngineError(f"--quantization int8 cannot be served here: {why}")
