"""Int8 weights: what serving (`--quantization int8`) and evaluation share.

Decoding one sequence reads every weight once per token, so its speed is the weight bytes per
token over the memory bandwidth: DistilGPT2's products hold 81 M weights, 324 MB a token in
float32, 162 MB in bf16, 81 MB in int8. Each weight matrix is stored as int8 with one float
scale per output row (symmetric: w ~ scale[row] * q, q in [-127, 127], scale = max|w_row| / 127).

Two products use those weights, and give the same answer within the rounding of 8-bit
activations (the tests hold both to one dequantized reference):
- wikigpt's kernel (csrc/q8_linear.cpp, built by q8kernel.py): activations as llama.cpp's q8_0
  quantizes them, signed int8 with one scale per block of 32 values, integer sums per block
  that never saturate, on AVX2, AVX-512 VNNI or portable C++. Exact on every x86 CPU, and a
  row's numbers never depend on the rows beside it. It reads the weights once per call, so it
  leads at one or a few rows (the bandwidth-bound decoding step); its per-block rescaling costs
  multiply work at many rows.
- FBGEMM's dynamically quantized linear (`torch.ops.quantized.linear_dynamic`): activations
  uint8 with one scale per call. With VNNI its products are exact and its many-row GEMM is
  faster; without VNNI it sums u8 x s8 pairs into int16 with saturation (2 x 255 x 127 = 64,770
  > 32,767) and would need 7-bit activations, twice the rounding step: it is not used there.

`backends()` measures, once per process, at which row counts our kernel beats FBGEMM (where
both run) and which SIMD path of ours is fastest; each call then takes the product measured
faster for its row count. torch 2.13 marks its quantized tensor types deprecated (to move to
torchao): our kernel needs only torch's C++ operator API (TORCH_LIBRARY), so it outlives them;
where neither runs, `unavailable()` says why and serving keeps full precision.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import q8kernel
from .timing import best_times

log = logging.getLogger("wikigpt.engine")


@dataclass(frozen=True)
class Backends:
    """What runs here, measured once (backends())."""

    q8_path: int | None  # our kernel's fastest SIMD path (q8kernel.PATHS), None: not built
    q8_why: str | None  # why our kernel does not run, if it does not
    fbgemm_exact: bool  # FBGEMM runs here with 8-bit activations that do not saturate
    q8_rows: int  # calls of up to this many rows take our kernel, larger ones FBGEMM (if exact)

    def describe(self) -> str:
        ours = f"wikigpt q8 kernel ({q8kernel.PATHS[self.q8_path]}, int8 activations per block of 32)" \
            if self.q8_path is not None else None
        fbgemm = "FBGEMM dynamic int8" if self.fbgemm_exact else None
        if ours and fbgemm:  # q8_rows 0: FBGEMM measured faster at every row count
            return f"{ours} up to {self.q8_rows} rows, {fbgemm} above" if self.q8_rows else f"{fbgemm} (faster here)"
        return ours or fbgemm or "none"


@functools.cache
def backends() -> Backends:
    q8_why = q8kernel.load()
    fbgemm_exact = _fbgemm_exact()
    if q8_why is not None:
        if not fbgemm_exact:
            return Backends(None, q8_why, False, 0)
        log.warning("int8 products: wikigpt's kernel is unavailable (%s); FBGEMM's are used", q8_why)
        return Backends(None, q8_why, True, 0)
    # Decoding reads weights that do not fit in cache: the candidates are timed over 40 of
    # DistilGPT2's 768 x 3072 products (40 x 2.4 MB = 94 MB, more than the L3 of the CPUs we
    # run on); a single cache-resident weight would time the caches instead of memory.
    g = torch.Generator().manual_seed(0)
    qs = [torch.randint(-127, 128, (768, 3072), dtype=torch.int8, generator=g) for _ in range(40)]
    scale = torch.full((768,), 1e-3)

    def ours(x, path):
        return lambda: [torch.ops.wikigpt.q8_linear(x, q, scale, None, path) for q in qs]

    x1 = torch.randn(1, 3072, generator=g)
    times = dict(zip(q8kernel.paths(), best_times(*(ours(x1, p) for p in q8kernel.paths()), runs=8)))
    path = min(times, key=times.get)
    found = [", ".join(f"{q8kernel.PATHS[p]} {t * 1e3:.2f}" for p, t in times.items()) + " ms at 1 row"]
    rows = 1 << 30
    if fbgemm_exact:  # the largest row count at which ours still wins
        packed = [_fbgemm_pack(q, scale, None) for q in qs]
        rows = 0
        for n in (1, 2, 4, 8, 16, 32):
            x = torch.randn(n, 3072, generator=g)
            t_ours, t_fbgemm = best_times(ours(x, path),
                                          lambda: [torch.ops.quantized.linear_dynamic(x, p, False) for p in packed],
                                          runs=8)
            found.append(f"{n} rows q8/FBGEMM {t_ours * 1e3:.2f}/{t_fbgemm * 1e3:.2f} ms")
            if t_ours >= t_fbgemm:
                break
            rows = n
    log.info("int8 products: %s", "; ".join(found))
    return Backends(path, None, fbgemm_exact, rows)


def unavailable() -> str | None:
    """None where int8 products run here, else why not (one line)."""
    b = backends()
    if b.q8_path is not None or b.fbgemm_exact:
        return None
    return (f"wikigpt's int8 kernel is unavailable ({b.q8_why}) and FBGEMM's 8-bit activations "
            "saturate on this CPU (no VNNI)")


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [out, in padded to a multiple of 32] and float32 scales [out]."""
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return torch.nn.functional.pad(q, (0, -weight.shape[1] % 32)).contiguous(), scale.float()


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, columns: int | None = None):
    """FBGEMM's packed copy of the same integers and scales."""
    q = q[:, :columns or q.shape[1]].contiguous()
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # the deprecation notice, once per weight otherwise
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qt, bias)


def _fbgemm_exact() -> bool:
    """Whether FBGEMM runs here with 8-bit activations that do not saturate. Without VNNI
    (AVX2-only CPUs) it sums pairs of uint8 x int8 products into int16 with saturation. Measured,
    not looked up: the largest product is computed and compared."""
    try:
        q, scale = _quantize_rows(torch.full((16, 64), 1.0))
        x = torch.full((1, 64), 1.0)
        y = torch.ops.quantized.linear_dynamic(x, _fbgemm_pack(q, scale, None), False)
    except Exception:  # a torch build without FBGEMM / quantized ops
        return False
    return torch.allclose(y, x @ torch.full((16, 64), 1.0).T, rtol=1e-3)


class Int8Weight:
    """y = x W^T + b with W [out, in] held as per-row int8; x [rows, in] of any float dtype,
    y float32. Each call takes the product backends() measured faster for its row count."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        b = backends()
        if b.q8_path is None and not b.fbgemm_exact:
            raise RuntimeError(f"int8 products are unavailable here ({unavailable()})")
        weight = weight.detach().float()
        self.shape = tuple(weight.shape)
        self.q, self.scale = _quantize_rows(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        ours = b.q8_path is not None and (b.q8_rows > 0 or not b.fbgemm_exact)
        self.path = b.q8_path if ours else None
        self.q8_rows = b.q8_rows if b.fbgemm_exact else 1 << 30  # calls above this take FBGEMM
        # FBGEMM's copy only where some row counts take it (DistilGPT2: 81 MB more)
        self.packed = _fbgemm_pack(self.q, self.scale, self.bias, self.shape[1]) if b.fbgemm_exact else None
        if not ours:
            self.q = None  # FBGEMM alone: its packed copy is all that is read

    def __call__(self, x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-5,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """[residual +] (layer_norm(x, ln, eps) or x) W^T + b: our kernel normalises and adds
        inside the call, so a decoding step makes no separate norm or add calls (~8 us each)."""
        x = x.float().contiguous()
        if self.path is not None and x.shape[0] <= self.q8_rows:
            ln_w, ln_b = ln if ln is not None else (None, None)
            return torch.ops.wikigpt.q8_linear(x, self.q, self.scale, self.bias, self.path, ln_w, ln_b, eps, residual)
        if ln is not None:
            x = torch.nn.functional.layer_norm(x, (x.shape[1],), ln[0].float(), ln[1].float(), eps)
        y = torch.ops.quantized.linear_dynamic(x, self.packed, False)
        return y if residual is None else y + residual

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 weight and bias these products use (int8 x scale): the reference."""
        if self.q is None:
            q, bias = torch.ops.quantized.linear_unpack(self.packed)
            return q.dequantize(), bias
        return self.q[:, :self.shape[1]].float() * self.scale[:, None], self.bias


class Int8Linear(nn.Module):
    """A transformers `nn.Linear` or GPT-2 `Conv1D` ([in, out] weights) with int8 weights, for
    the transformers forward (evaluation, tests' reference). Output in the input's dtype."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        weight = module.weight.detach()
        if type(module).__name__ == "Conv1D":
            weight = weight.t()
        self.q = Int8Weight(weight, getattr(module, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def quantize_model(model: nn.Module) -> nn.Module:
    """Every linear layer of a causal LM (GPT-2's Conv1D included) and its output head, int8, in
    place; embeddings and layer norms stay as they are. The model must be float32 on a CPU."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"int8 products are unavailable in this torch build ({reason})")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear(module))
    return model
