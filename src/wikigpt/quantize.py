"""Int8 weights: what serving (`--quantization int8`) and evaluation share.

Decoding one sequence reads every weight once per token, so its speed is the weight bytes per
token over the memory bandwidth: DistilGPT2's products hold 81 M weights, 324 MB a token in
float32, 162 MB in bf16, 81 MB in int8. Each weight matrix is stored as int8 with one float
scale per output row (symmetric: w ~ scale[row] * q, q in [-127, 127], scale = max|w_row| / 127).

The product is torch's dynamically quantized linear (`torch.ops.quantized.linear_dynamic`,
FBGEMM on x86), the kernel `torch.ao.quantization.quantize_dynamic` builds: weights packed once
into its blocked int8 layout; at each call the activations are quantized to uint8 with one
scale and zero point for the whole call (from its min and max), multiplied with int32 sums,
and rescaled to float32. llama.cpp's q8_0 likewise multiplies int8 by int8 with integer sums
(its activations per block of 32 values). Measured on the 25 products of one DistilGPT2 token
(2 threads, Intel Xeon with AMX, one row): 2.2 ms, against 7.0 ms for bf16 with oneDNN's
packed weights and 11.4 ms for float32 `F.linear`; weight-only int8 (Inductor's compiled
dequantize-and-reduce, or `aten._weight_int8pack_mm`) took 3.9-4.0 ms. No kernel of our own:
FBGEMM already reads the int8 weights at ~37 GB/s there.

Two caveats, both visible where they matter:
- One scale per call for the activations: in a batch, a row's numbers depend on the other rows
  (as with bf16's batch-dependent rounding); one sequence alone is quantized per token.
- torch 2.13 marks its quantized tensor types deprecated (to move to torchao). `unavailable()`
  says why int8 cannot run on a build that has lost them; serving then keeps full precision
  and says so.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn


@functools.cache
def unavailable() -> str | None:
    """None where int8 products run here, else why not (one line)."""
    try:
        Int8Weight(torch.randn(16, 32))(torch.randn(2, 32))
    except Exception as exc:  # a torch build without FBGEMM / quantized ops
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return None


@functools.cache
def _reduce_range() -> bool:
    """Whether activations must use 7 bits instead of 8. Without VNNI (AVX2-only CPUs), FBGEMM
    sums pairs of uint8 x int8 products into int16 with saturation: 2 x 255 x 127 = 64,770
    overflows 32,767. Measured, not looked up: the largest product is computed both ways, and
    7 bits are used only where 8 bits come out wrong."""
    w = torch.full((16, 64), 1.0)
    x = torch.full((1, 64), 1.0)
    return not torch.allclose(Int8Weight(w, reduce_range=False)(x), x @ w.T, rtol=1e-3)


class Int8Weight:
    """y = x W^T + b with W [out, in] held as per-row int8; x [rows, in] of any float dtype,
    y float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 reduce_range: bool | None = None) -> None:
        weight = weight.detach().float()
        self.shape = tuple(weight.shape)
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the deprecation notice above, once per weight otherwise
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
        self.reduce_range = _reduce_range() if reduce_range is None else reduce_range

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, self.reduce_range)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 weight and bias these products use (int8 x scale): the reference."""
        q, bias = torch.ops.quantized.linear_unpack(self.packed)
        return q.dequantize(), bias


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
