"""Matrix-vector and matrix-matrix products for decoding, picked by measurement at start-up.

Decoding reads every weight once per step, so a step's time is set by two products:
- one row (a single sequence): a matrix-vector product, bound by memory bandwidth. oneDNN's
  bf16 GEMV reads the 77 MB DistilGPT2 LM head at well under the machine's bandwidth, while
  a multiply-and-sum loop that torch.compile (Inductor) writes streams it at close to it;
- many rows: a matrix-matrix product, bound by the multiply units. oneDNN runs it faster on
  weights reordered once into its blocked layout (what Inductor's "freezing" does) than on
  plain row-major weights it re-blocks at every call.
Neither wins on every CPU (AVX2-only machines emulate bf16; some builds lack a C++ compiler
for Inductor), so each candidate is timed against plain `F.linear` on the model's largest
weight and kept only where it is faster and gives the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("wikigpt.engine")


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [1, in] @ weight[out, in].T, accumulated in float32: Inductor turns this into one
    vectorized pass over the weight (2 bytes read per bf16 weight, no temporaries)."""
    y = (weight.float() * x.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)[None]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per row: q [n, heads, hd] over keys/values [n, heads, L, hd] (strided views of
    the cache) where mask [n, 1, L] is True. Compiled, this is one pass over the keys and one
    over the values; SDPA's CPU kernel and batched matmuls take several times longer on these
    one-query shapes (32 rows x 40 positions: 0.3 ms against 1.9 ms measured)."""
    scores = (q.float()[:, :, None] * keys.float()).sum(-1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs[..., None] * values.float()).sum(-2).to(q.dtype)


def sdpa_decode_attention(q, keys, values, mask, scale):
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None],
                                          scale=scale)[:, :, 0]


@dataclass
class Kernels:
    """The measured choice for one dtype; `describe()` goes to the logs and the API's `/`."""

    gemv: Callable | None = None  # compiled _gemv for one-row products, or None: F.linear
    packed: bool = False  # oneDNN-blocked weights for many-row products
    attention: Callable = sdpa_decode_attention  # or the compiled _decode_attention

    def describe(self) -> str:
        return (f"one row: {'compiled GEMV' if self.gemv else 'F.linear'}; "
                f"many rows: {'oneDNN packed weights' if self.packed else 'F.linear'}; attention: "
                f"{'SDPA' if self.attention is sdpa_decode_attention else 'compiled'}")


class Linear:
    """y = x W^T + b with the kernels chosen for this dtype. x is 2-D [rows, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: Kernels) -> None:
        self.weight, self.bias = weight.contiguous(), bias
        self.gemv = kernels.gemv
        self.packed = _pack(self.weight) if kernels.packed else None
        if self.packed is not None and self.gemv is None:
            self.weight = None  # only the packed copy is read: do not keep two

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.gemv is not None:
            return self.gemv(x, self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the batch-size hint only tunes the blocking; the packed weight serves any row count
    return torch.ops.mkldnn._reorder_linear_weight(weight, 32)


def _best_times(*fns: Callable[[], torch.Tensor], seconds: float = 0.6, runs: int = 20) -> list[float]:
    """Best time of each candidate, the calls interleaved (a, b, a, b, ...) so that a burst
    of load from elsewhere on the machine slows both alike instead of deciding the choice."""
    for fn in fns:
        fn()  # first call: kernel selection, compilation
    best, deadline = [float("inf")] * len(fns), time.perf_counter() + seconds
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return best


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def choose_kernels(weight: torch.Tensor, *, compile: bool, batch: int = 32, heads: int = 12,
                   head_dim: int = 64) -> Kernels:
    """Time the candidates on `weight` (the biggest one, usually the LM head) and keep the
    faster. CUDA keeps F.linear (cuBLAS is already the fast path there)."""
    kernels = Kernels()
    if weight.device.type != "cpu":
        return kernels
    with torch.inference_mode():
        one = torch.randn(1, weight.shape[1], dtype=weight.dtype)
        many = torch.randn(batch, weight.shape[1], dtype=weight.dtype)
        if compile:
            try:
                kernels.gemv = _try_gemv(weight, one)
                kernels.attention = _try_attention(weight.dtype, batch, heads, head_dim)
            except Exception as exc:  # no C++ compiler, an Inductor bug: keep eager kernels, say why
                log.warning("torch.compile unavailable (%s: %s); decoding uses eager kernels",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        try:
            packed = _pack(weight)
            run = lambda: torch.ops.mkldnn._linear_pointwise(many, packed, None, "none", [], "")  # noqa: E731
            if _close(run(), F.linear(many, weight)):
                t, plain = _best_times(run, lambda: F.linear(many, weight))
                log.info("%d rows: oneDNN packed %.2f ms vs F.linear %.2f ms", batch, t * 1e3, plain * 1e3)
                kernels.packed = t < plain
        except (RuntimeError, AttributeError) as exc:  # op missing in this torch build / dtype
            log.info("oneDNN packed weights unavailable for %s: %s", weight.dtype, str(exc).splitlines()[0][:200])
    return kernels


def _try_gemv(weight: torch.Tensor, one: torch.Tensor) -> Callable | None:
    gemv = torch.compile(_gemv, dynamic=False)
    if not _close(gemv(one, weight, None), F.linear(one, weight)):
        return None
    t, plain = _best_times(lambda: gemv(one, weight, None), lambda: F.linear(one, weight))
    log.info("one row: compiled GEMV %.2f ms vs F.linear %.2f ms", t * 1e3, plain * 1e3)
    return gemv if t < plain else None


def _try_attention(dtype: torch.dtype, rows: int, heads: int, head_dim: int, span: int = 128) -> Callable:
    """Compiled with dynamic shapes (rows and positions vary every step); rows = 1 and rows > 1
    are two graphs, both compiled here rather than during the first requests."""
    attention = torch.compile(_decode_attention, dynamic=True)
    best = sdpa_decode_attention
    for n in sorted({1, max(2, rows)}):
        cache = torch.randn(n, heads, span, head_dim, dtype=dtype)
        q = torch.randn(n, heads, head_dim, dtype=dtype)
        mask = torch.ones(n, 1, span, dtype=torch.bool)
        mask[0, 0, span // 2:] = False
        args = (q, cache, cache, mask, head_dim ** -0.5)
        if not _close(attention(*args), sdpa_decode_attention(*args)):
            return sdpa_decode_attention
        fast, slow = _best_times(lambda: attention(*args), lambda: sdpa_decode_attention(*args))
        log.info("attention, %d rows: compiled %.2f ms vs SDPA %.2f ms", n, fast * 1e3, slow * 1e3)
        if n > 1 and fast < slow:
            best = attention
    return best
