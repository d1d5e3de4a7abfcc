"""Matrix-vector and matrix-matrix products for decoding, picked by measurement at start-up.

Decoding reads every weight once per step, so a step's time is set by two products:
- one row (a single sequence): a matrix-vector product, bound by memory bandwidth. oneDNN's
  bf16 GEMV reads the 77 MB DistilGPT2 LM head at well under the machine's bandwidth, while
  a multiply-and-sum loop that Inductor compiles streams it at close to it;
- many rows: a matrix-matrix product, bound by the multiply units. oneDNN runs it faster on
  weights reordered once into its blocked layout (what Inductor's "freezing" does) than on
  plain row-major weights it re-blocks at every call.
Neither wins on every CPU (AVX2-only machines emulate bf16; some builds lack a C++ compiler
for Inductor), so each candidate is timed against plain `F.linear` on the model's largest
weight and kept only where it is faster and gives the same numbers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from .. import q8kernel
from ..quantize import Int8Weight, backends
from ..timing import best_times

log = logging.getLogger("wikigpt.engine")


def row_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, in] @ weight[out, in].T, accumulated in float32: Inductor turns this into one
    vectorized pass over the weight (2 bytes read per bf16 weight, no temporaries)."""
    y = (weight.float() * x.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)[None]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per row: q [n, heads, hd] over keys/values [n, heads, L, hd] (strided views of
    the cache) where mask [n, 1, L] is True. Compiled, this is one pass over the keys and one
    over the values; SDPA's CPU kernel and batched matmuls take several times longer on these
    one-query shapes (the start-up measurement chooses: choose_kernels)."""
    scores = (q.float()[:, :, None] * keys.float()).sum(-1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs[..., None] * values.float()).sum(-2).to(q.dtype)


def exception_line(exc: BaseException) -> str:
    """An exception's message for a one-line log: its first line, at most 200 characters."""
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


def sdpa_decode_attention(q, keys, values, mask, scale):
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None],
                                          scale=scale)[:, :, 0]


def cpp_decode_attention(q, keys, values, mask, scale):
    """One row only: wikigpt's C++ kernel (csrc/attention.cpp), where the kernels library loads."""
    return torch.ops.wikigpt.decode_attention(q, keys, values, mask, scale)


def _inductor_cache_per_capability() -> None:
    """Under ATEN_CPU_CAPABILITY (docs/engine.md#int8-weights: an AVX2-only CPU's paths on an
    AVX-512 machine), Inductor's on-disk cache in a folder of its own. torch 2.13's cache key
    leaves the capability out: a graph generated for AVX-512's 16-wide vectors was reloaded and
    compiled for AVX2's 8-wide ones, and gave wrong logits (0.6 off) and NaN attention
    (tests/test_engine_forward.py)."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if not cap:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if not base.endswith(f"-{cap}"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{base}-{cap}"


def compile_graph(fn: Callable, example: list[torch.Tensor], symbolic: bool = False) -> Callable:
    """`fn` traced and compiled by Inductor for the shapes of `example` (every size symbolic
    except 1 with `symbolic`), called without Dynamo: torch.compile's guard checks and wrappers
    cost ~30 us per call, and a DistilGPT2 token makes 31 such calls (~1 ms of ~8). vLLM
    compiles its graphs the same way (InductorStandaloneAdaptor)."""
    _inductor_cache_per_capability()
    # no duck shaping: sizes that happen to be equal in the example (32 rows, head size 32) must
    # not become one symbol, or the graph would require them equal at every call
    with fx_config.patch(use_duck_shape=False):
        graph = make_fx(fn, tracing_mode="symbolic" if symbolic else "real")(*example)
        return torch._inductor.standalone_compile(
            graph, example, dynamic_shapes="from_graph" if symbolic else "from_example_inputs")


@dataclass
class Attention:
    """One-query attention: a kernel for one row and one for many (SDPA, wikigpt's C++ kernel for
    one row, or a compiled graph; one compiled graph cannot serve both: tracing specialises sizes
    equal to 1)."""

    one: Callable
    many: Callable

    def __call__(self, q, keys, values, mask, scale) -> torch.Tensor:
        return (self.one if q.shape[0] == 1 else self.many)(q, keys, values, mask, scale)


def attention_name(fn: Callable) -> str:
    """An attention kernel's name in the logs and `/`: anything else is an Inductor graph."""
    return {sdpa_decode_attention: "SDPA", cpp_decode_attention: "wikigpt C++"}.get(fn, "compiled")


@dataclass
class Kernels:
    """The measured choice for one dtype; `describe()` goes to the logs and the API's `/`."""

    compiled_gemv: bool = False  # one-row products by the compiled _gemv, else F.linear
    packed: bool = False  # oneDNN-blocked weights for many-row products
    int8: bool = False  # every product with int8 weights (quantize.py), at any row count
    attention: Callable = sdpa_decode_attention  # or an Attention with compiled kernels
    _gemvs: dict = field(default_factory=dict, repr=False)  # (shape, dtypes, bias?) -> compiled

    def gemv(self, weight: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype | None = None) -> Callable | None:
        """The compiled one-row product for `weight`'s shape (compiled on first sight), or None."""
        if not self.compiled_gemv:
            return None
        key = (tuple(weight.shape), weight.dtype, out_dtype, bias is not None)
        if key not in self._gemvs:
            self._gemvs[key] = _compile_gemv(weight, bias, out_dtype)
        return self._gemvs[key]

    def describe(self) -> str:
        att = self.attention
        att = (f"{attention_name(att.one)} (1 row), {attention_name(att.many)} (more)"
               if isinstance(att, Attention) else "SDPA")
        if self.int8:
            return f"products: int8 weights, per-row scales ({backends().describe()}); attention: {att}"
        return (f"one row: {'compiled GEMV' if self.compiled_gemv else 'F.linear'}; "
                f"many rows: {'oneDNN packed weights' if self.packed else 'F.linear'}; attention: {att}")


def _compile_gemv(weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> Callable:
    x = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    if bias is None:
        run = compile_graph(lambda x, w: row_product(x, w, None, out_dtype), [x, weight])
        return lambda x, w, b: run(x, w)
    run = compile_graph(lambda x, w, b: row_product(x, w, b, out_dtype), [x, weight, bias])
    return run


# The row counts many-row products run at. oneDNN (packed weights, and bf16 F.linear) builds and
# caches one primitive per input shape, each holding ~0.6 MB (DistilGPT2's weights, measured),
# and its cache keeps 1,024 of them: prefills of arbitrary length made a new shape per request,
# and a server's RSS grew by ~50 KB a request for thousands of requests. So products of up to
# EXACT_ROWS rows (the usual decoding batches) run as they are, larger ones in tiles of
# TILE_ROWS rows, the last padded to a multiple of ROW_STEP: at most 32 + 224 / 16 = 46 shapes
# per weight, ~100 MB for DistilGPT2's five, reached once. Tiling costs prefill 3-12 % of its
# product time at 2,048 rows (fp32 / bf16, measured), and prefill is a small part of serving.
EXACT_ROWS, TILE_ROWS, ROW_STEP = 32, 256, 16


class Linear:
    """y = x W^T + b with the kernels chosen for this dtype. x is 2-D [rows, in]. `float_rows`:
    the one-row product returns float32 (the LM head: its logits are wanted in float32, and
    converting to bf16 and back is a second pass and a copy of 50,304 values). With int8 weights
    every product returns float32, the int8 forward's activations (gpt2.GPT2Forward)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: Kernels,
                 float_rows: bool = False) -> None:
        self.int8 = Int8Weight(weight, bias) if kernels.int8 else None
        self.float_rows = float_rows
        if self.int8 is not None:  # the int8 copy is all that is read
            self.weight, self.bias, self.gemv, self.packed = None, None, None, None
            return
        self.weight, self.bias = weight.contiguous(), bias
        self.gemv = kernels.gemv(self.weight, bias, torch.float32 if float_rows else None)
        self.packed = _pack(self.weight) if kernels.packed else None
        if self.packed is not None and self.gemv is None:
            self.weight = None  # only the packed copy is read: do not keep two

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:  # neither int8 product keeps per-shape state: no tiling needed
            return self.int8(x)
        rows = x.shape[0]
        if rows == 1 and self.gemv is not None:
            return self.gemv(x, self.weight, self.bias)
        if rows <= EXACT_ROWS:
            return self._product(x)
        if rows <= TILE_ROWS:
            return self._padded(x)
        return torch.cat([self._padded(tile) for tile in x.split(TILE_ROWS)])

    def fused(self, x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-5,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """[residual +] (layer_norm(x) or x) W^T + b: in one call with int8 weights (quantize.py),
        as separate calls otherwise."""
        if self.int8 is not None:
            return self.int8(x, ln, eps, residual)
        if ln is not None:
            x = F.layer_norm(x, (x.shape[-1],), *ln, eps)
        y = self(x)
        return y if residual is None else residual + y

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows padded with zeros to the next multiple of ROW_STEP, the padding's rows dropped."""
        rows = x.shape[0]
        extra = -rows % ROW_STEP if rows > EXACT_ROWS else 0
        if not extra:
            return self._product(x)
        return self._product(F.pad(x, (0, 0, 0, extra)))[:rows]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the batch-size hint only tunes the blocking; the packed weight serves any row count
    return torch.ops.mkldnn._reorder_linear_weight(weight, 32)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def choose_kernels(weight: torch.Tensor, *, compile: bool, batch: int = 32, heads: int = 12,
                   head_dim: int = 64, context: int = 1024) -> Kernels:
    """Time the candidates on `weight` (the biggest one, usually the LM head) and keep the
    faster. CUDA keeps F.linear (cuBLAS is already the fast path there)."""
    kernels = Kernels()
    if weight.device.type != "cpu":
        return kernels
    with torch.inference_mode():
        one = torch.randn(1, weight.shape[1], dtype=weight.dtype)
        many = torch.randn(batch, weight.shape[1], dtype=weight.dtype)
        inductor = compile
        if compile:
            try:
                kernels.compiled_gemv = _gemv_pays(kernels, weight, one)
            except Exception as exc:  # no C++ compiler, an Inductor bug: keep eager kernels, say why
                kernels.compiled_gemv, kernels._gemvs, inductor = False, {}, False
                log.warning("Inductor unavailable (%s: %s); decoding uses eager kernels",
                            type(exc).__name__, exception_line(exc))
        kernels.attention = _choose_attention(weight.dtype, batch, heads, head_dim, context, inductor)
        try:
            packed = _pack(weight)
            run = lambda: torch.ops.mkldnn._linear_pointwise(many, packed, None, "none", [], "")  # noqa: E731
            if _close(run(), F.linear(many, weight)):
                t, plain = best_times(run, lambda: F.linear(many, weight))
                log.info("%d rows: oneDNN packed %.2f ms vs F.linear %.2f ms", batch, t * 1e3, plain * 1e3)
                kernels.packed = t < plain
        except (RuntimeError, AttributeError) as exc:  # op missing in this torch build / dtype
            log.info("oneDNN packed weights unavailable for %s: %s", weight.dtype, exception_line(exc))
    return kernels


def _gemv_pays(kernels: Kernels, weight: torch.Tensor, one: torch.Tensor) -> bool:
    kernels.compiled_gemv = True
    gemv = kernels.gemv(weight, None, torch.float32)  # as the LM head uses it
    if not _close(gemv(one, weight, None), F.linear(one, weight)):
        return False
    t, plain = best_times(lambda: gemv(one, weight, None), lambda: F.linear(one, weight))
    log.info("one row: compiled GEMV %.2f ms vs F.linear %.2f ms", t * 1e3, plain * 1e3)
    return t < plain


def compiled_attention(dtype: torch.dtype, rows: int, heads: int, head_dim: int, context: int) -> Attention:
    """_decode_attention compiled for one row and for 2..rows rows, every other size symbolic
    (positions and rows change every step)."""
    return Attention(*(_compile_attention(_attention_inputs(dtype, n, heads, head_dim, context), head_dim)
                       for n in (1, max(2, rows))))


def _compile_attention(inputs: tuple[torch.Tensor, ...], head_dim: int) -> Callable:
    """Traced on `inputs`, laid out as gpt2.py passes them: q a view of the fused QKV output,
    keys/values views of a cache as long as the real one (the strides are part of the graph)."""
    scale = head_dim ** -0.5
    run = compile_graph(lambda q, k, v, m: _decode_attention(q, k, v, m, scale), list(inputs), symbolic=True)
    return lambda q, k, v, m, scale, run=run: run(q, k, v, m)  # scale is in the graph


def _attention_inputs(dtype, n, heads, head_dim, context, span: int = 128):
    """q, keys, values, mask; keys and values distinct tensors (traced with one tensor passed
    twice, the graph would read the keys for the values)."""
    keys, values = torch.randn(2, n, heads, max(context, span), head_dim, dtype=dtype)[:, :, :, :span]
    q = torch.randn(n, 3, heads, head_dim, dtype=dtype)[:, 0]
    mask = torch.ones(n, 1, span, dtype=torch.bool)
    mask[0, 0, span // 2:] = False
    return q, keys, values, mask


def _choose_attention(dtype: torch.dtype, rows: int, heads: int, head_dim: int, context: int,
                      inductor: bool) -> Attention:
    """For one row and for many, the fastest of SDPA, the compiled kernel (with `inductor`) and,
    for one row, wikigpt's C++ kernel (where its library loads), each kept only where it gives
    SDPA's numbers."""
    chosen = []
    for n in (1, max(2, rows)):
        inputs = _attention_inputs(dtype, n, heads, head_dim, context)  # ~100 MB at 32 rows: made once
        args = (*inputs, head_dim ** -0.5)
        found = [sdpa_decode_attention]
        if n == 1 and q8kernel.load() is None:
            found.append(cpp_decode_attention)
        if inductor:
            try:
                found.append(_compile_attention(inputs, head_dim))
            except Exception as exc:  # an Inductor bug on this graph: the other candidates remain
                log.warning("attention, %d rows: compiling failed (%s: %s)", n, type(exc).__name__, exception_line(exc))
        reference = sdpa_decode_attention(*args)
        fns = [fn for fn in found if fn is sdpa_decode_attention or _close(fn(*args), reference)]
        times = best_times(*(lambda fn=fn: fn(*args) for fn in fns))
        log.info("attention, %d rows: %s", n,
                 ", ".join(f"{attention_name(fn)} {t * 1e3:.3f} ms" for fn, t in zip(fns, times)))
        chosen.append(fns[times.index(min(times))])
    return Attention(*chosen)
