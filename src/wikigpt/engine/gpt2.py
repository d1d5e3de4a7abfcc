"""An inference-only forward pass for GPT-2-family models on a slot-indexed KV cache.

Why not the transformers forward: per decoding step it builds cache objects, attention masks
and position ids in Python and reads each weight through nn.Module calls, which costs more than
the arithmetic at small batches; and its cache must be re-indexed whenever a request joins or
leaves. This is nanoGPT's GPT-2 (fused QKV, pre-norm blocks, tied LM head) over plain weight
tensors, with a preallocated cache (kv_cache.py) and the matmul kernels measured at start-up
(kernels.py). Models it does not support exactly fall back to the transformers path (hf.py).

Decoding runs rows [0, highest used slot]: free slots below that ride along as dummy rows
(position 0, output dropped) so that every cache access is a view, never a gather copy.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kernels import Kernels, Linear, compile_graph, exception_line, row_product
from .kv_cache import SlotKVCache

log = logging.getLogger("wikigpt.engine")

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def padded_head(weight: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """The LM head with zero rows up to a multiple of 64 (nanoGPT's vocabulary padding).
    oneDNN blocks its GEMMs in 16/64-wide tiles and handles GPT-2's 50,257 rows with a slow
    remainder path; padded to 50,304 rows it takes the fast one. The extra logits are sliced
    off."""
    extra = -weight.shape[0] % multiple
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


def unsupported_reason(model) -> str | None:
    """Why this model cannot use the lean forward, or None when it can."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "gpt2":
        return f"model type {getattr(cfg, 'model_type', '?')!r} is not GPT-2"
    if cfg.activation_function not in _ACTIVATIONS:
        return f"activation {cfg.activation_function!r}"
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
        return "non-default attention scaling"
    if getattr(cfg, "add_cross_attention", False):
        return "cross-attention"
    return None


class _Block:
    def __init__(self, sd: dict, prefix: str, dtype: torch.dtype, kernels: Kernels) -> None:
        def w(name):
            return sd[prefix + name].to(dtype)

        def conv1d(name):  # transformers' Conv1D stores [in, out]; F.linear wants [out, in]
            if kernels.int8:  # quantized from the checkpoint's own values, not a bf16 rounding of them
                return Linear(sd[prefix + name + ".weight"].t(), sd[prefix + name + ".bias"], kernels)
            return Linear(w(name + ".weight").t().contiguous(), w(name + ".bias"), kernels)

        self.ln1 = (w("ln_1.weight"), w("ln_1.bias"))
        self.ln2 = (w("ln_2.weight"), w("ln_2.bias"))
        self.qkv, self.attn_proj = conv1d("attn.c_attn"), conv1d("attn.c_proj")
        self.fc, self.mlp_proj = conv1d("mlp.c_fc"), conv1d("mlp.c_proj")


class GPT2Forward:
    """Prefill and decode on the cache; returns float32 logits of the positions that need them.

    `dtype` is the activations' with full-precision weights (the cache keeps its own). With int8 weights
    the activations stay float32 (both int8 products take and give float32): in bf16 every
    product would convert its input, its residual and its output, ~14 copies a block, 0.3-0.4 ms
    of a 4 ms one-row step (measured on Zen 4), and round the residual stream to 8 bits of
    mantissa at every block. Only attention meets the cache's dtype: the QKV product's output
    is cast to it (2,304 values a block at one row), the attention's output back."""

    def __init__(self, model, cache: SlotKVCache, dtype: torch.dtype, kernels: Kernels) -> None:
        cfg = model.config
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        self.cache, self.kernels = cache, kernels
        self.kv_dtype = cache.kv.dtype
        dtype = self.dtype = torch.float32 if kernels.int8 else dtype  # the activations'
        self.n_head, self.dim = cfg.n_head, cfg.n_embd
        self.scale = (cfg.n_embd // cfg.n_head) ** -0.5
        self.eps = cfg.layer_norm_epsilon
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.device = next(model.parameters()).device
        self.wte = sd["transformer.wte.weight"].to(dtype)
        self.wpe = sd["transformer.wpe.weight"].to(dtype)
        self.blocks = [_Block(sd, f"transformer.h.{i}.", dtype, kernels) for i in range(cfg.n_layer)]
        self.ln_f = (sd["transformer.ln_f.weight"].to(dtype), sd["transformer.ln_f.bias"].to(dtype))
        head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
        self.vocab = head.shape[0]
        self.head = Linear(head if kernels.int8 else padded_head(head.to(dtype)), None, kernels, float_rows=True)
        self.one_row = None
        if kernels.compiled_gemv:
            try:
                self.one_row = _OneRow(self)
            except Exception as exc:  # an Inductor bug on these graphs: one row keeps the per-op path
                log.warning("one-row decoding graphs failed to compile (%s: %s); using separate kernels",
                            type(exc).__name__, exception_line(exc))

    def _norm(self, x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return _norm(x, *ln, dim=self.dim, eps=self.eps)

    def _mlp(self, x: torch.Tensor, block: _Block) -> torch.Tensor:
        return x + block.mlp_proj(self.act(block.fc(self._norm(x, block.ln2))))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._norm(x, self.ln_f))[:, :self.vocab].float()

    def prefill(self, slots: list[int], prompts: list[list[int]], every_position: bool = False):
        """Run the prompts (right-padded into one batch), store their keys and values in their
        slots and return the logits of each prompt's last token [n, vocab], or with
        `every_position` a list of each prompt's logits at all of its positions [len, vocab].
        A slot that already holds keys (cache.lengths, from a cached prefix) keeps them: only
        the positions after them are computed (and, with `every_position`, returned)."""
        starts = [self.cache.lengths[s] for s in slots]
        if any(starts):
            return self._extend(slots, prompts, starts, every_position)
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        rows = torch.tensor(slots, device=self.device)
        h, hd = self.n_head, self.dim // self.n_head
        x = (self.wte[ids] + self.wpe[:width]).view(n * width, self.dim)
        for layer, b in enumerate(self.blocks):
            q, k, v = b.qkv(self._norm(x, b.ln1)).to(self.kv_dtype).view(n, width, 3, h, hd).permute(2, 0, 3, 1, 4)
            self.cache.keys[layer][rows, :, :width] = k
            self.cache.values[layer][rows, :, :width] = v
            # right padding: a real query only sees earlier positions, all real, so the causal
            # mask alone is right; rows of padding compute garbage that nobody reads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).to(self.dtype)
            x = x + b.attn_proj(y.transpose(1, 2).reshape(n * width, self.dim))
            x = self._mlp(x, b)
        return self._prefilled(slots, prompts, x, width, every_position)

    def _extend(self, slots: list[int], prompts: list[list[int]], starts: list[int], every_position: bool):
        """Prefill of the positions after each slot's cached prefix: prompt i's new tokens sit at
        positions starts[i]..len-1 and attend over its own slot, where the prefix already is.
        Attention runs row by row on views of the cache: gathering the rows' keys into one
        batch would copy them (n = 16 choices of an 800-token prompt: 440 MB a prefill)."""
        n, width = len(prompts), max(len(p) - s for p, s in zip(prompts, starts))
        ids = torch.zeros(n, width, dtype=torch.long)
        pos = torch.zeros(n, width, dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, starts)):
            ids[i, :len(p) - s] = torch.tensor(p[s:])
            pos[i] = torch.arange(s, s + width).clamp_(max=len(p) - 1)  # padding: any valid position
        ids, pos = ids.to(self.device), pos.to(self.device)
        # query t of prompt i (position starts[i] + t) sees keys 0 .. its own position; as an
        # additive [1, 1, new, len] mask SDPA takes its flash kernel, where a boolean one falls
        # back to the math path (about 3x slower)
        masks = [torch.zeros(1, 1, len(p) - s, len(p), dtype=self.kv_dtype, device=self.device).masked_fill_(
                     torch.arange(len(p), device=self.device)[None] > pos[i, :len(p) - s, None], float("-inf"))
                 for i, (p, s) in enumerate(zip(prompts, starts))]
        h, hd = self.n_head, self.dim // self.n_head
        x = (self.wte[ids] + self.wpe[pos]).view(n * width, self.dim)
        for layer, b in enumerate(self.blocks):
            q, k, v = b.qkv(self._norm(x, b.ln1)).to(self.kv_dtype).view(n, width, 3, h, hd).permute(2, 0, 3, 1, 4)
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            y = torch.zeros_like(q)  # padding queries stay zero; nobody reads them
            for i, (slot, p, s) in enumerate(zip(slots, prompts, starts)):
                new = len(p) - s
                keys[slot, :, s:len(p)], values[slot, :, s:len(p)] = k[i, :, :new], v[i, :, :new]
                y[i, :, :new] = F.scaled_dot_product_attention(
                    q[i:i + 1, :, :new], keys[slot:slot + 1, :, :len(p)], values[slot:slot + 1, :, :len(p)],
                    attn_mask=masks[i])[0]
            x = x + b.attn_proj(y.transpose(1, 2).reshape(n * width, self.dim).to(self.dtype))
            x = self._mlp(x, b)
        computed = [p[s:] for p, s in zip(prompts, starts)]
        return self._prefilled(slots, prompts, x, width, every_position, computed)

    def _prefilled(self, slots, prompts, x, width, every_position, computed=None):
        computed = computed or prompts
        for s, p in zip(slots, prompts):
            self.cache.lengths[s] = len(p)
            self.cache.remember(s, p)
        if every_position:
            return [self._logits(x[i * width:i * width + len(c)]) for i, c in enumerate(computed)]
        last = torch.tensor([i * width + len(c) - 1 for i, c in enumerate(computed)], device=self.device)
        return self._logits(x[last])

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each slot in `slots` (their next input ids, [B]); returns [B, vocab]."""
        if len(slots) == 1 and self.one_row is not None:
            return self.one_row(slots[0], tokens)
        lengths = self.cache.lengths
        n = max(slots) + 1
        real = None
        if len(slots) == n and slots == sorted(slots):
            ids = tokens
        else:  # free slots below the highest used one ride along as dummy rows, which must
            # not write their keys: a free slot may hold a remembered prefix (prefix caching)
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            ids[slots] = tokens
            real = torch.tensor(slots, device=self.device)
        pos_list = lengths[:n]
        pos = torch.tensor(pos_list, device=self.device)
        span = max(pos_list) + 1  # attend over [0, longest row]; shorter rows are masked
        mask = (torch.arange(span, device=self.device)[None] <= pos[:, None])[:, None]  # [n, 1, span]
        h, hd = self.n_head, self.dim // self.n_head
        rows = torch.arange(n, device=self.device)
        x = self.wte[ids] + self.wpe[pos]
        for layer, b in enumerate(self.blocks):
            q, k, v = b.qkv.fused(x, b.ln1, self.eps).to(self.kv_dtype).view(n, 3, h, hd).unbind(1)
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            if n == 1:  # a plain copy: indexing by tensors costs ~15 us more per write
                keys[0, :, pos_list[0]], values[0, :, pos_list[0]] = k[0], v[0]
            elif real is None:
                keys[rows, :, pos], values[rows, :, pos] = k, v
            else:
                keys[real, :, pos[real]], values[real, :, pos[real]] = k[real], v[real]
            y = self.kernels.attention(q, keys[:n, :, :span], values[:n, :, :span], mask, self.scale)
            x = b.attn_proj.fused(y.reshape(n, self.dim).to(self.dtype), residual=x)
            x = b.mlp_proj.fused(self.act(b.fc.fused(x, b.ln2, self.eps)), residual=x)
        for s in slots:
            lengths[s] += 1
        if len(slots) != n or ids is not tokens:
            x = x[torch.tensor(slots, device=self.device)]
        return self.head.fused(x, self.ln_f, self.eps)[:, :self.vocab].float()

    def allocate(self) -> int:
        return self.cache.allocate()

    def allocate_for(self, ids: list[int]) -> tuple[int, int]:
        return self.cache.allocate_for(ids)

    def release(self, slots: list[int], held: list[list[int]] | None = None) -> None:
        for i, s in enumerate(slots):
            self.cache.release(s, held[i] if held else None)

    def describe(self) -> str:
        """The kernels it runs, for `/` and the logs."""
        chained = "; one sequence alone: the blocks as chained compiled graphs" if self.one_row is not None else ""
        return self.kernels.describe() + chained


class SplitForward:
    """Two forwards over one KV cache: `small` (int8 weights) for decoding steps of up to `rows`
    rows, `large` (full precision) for larger steps and for prefill, where the start-up
    measurement found full precision faster (builder.int8_rows)."""

    def __init__(self, small: GPT2Forward, large: GPT2Forward, rows: int) -> None:
        self.small, self.large, self.rows, self.cache = small, large, rows, large.cache

    def prefill(self, slots: list[int], prompts: list[list[int]], every_position: bool = False):
        return self.large.prefill(slots, prompts, every_position)

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        return (self.small if max(slots) < self.rows else self.large).decode(slots, tokens)

    def allocate(self) -> int:
        return self.cache.allocate()

    def allocate_for(self, ids: list[int]) -> tuple[int, int]:
        return self.cache.allocate_for(ids)

    def release(self, slots: list[int], held: list[list[int]] | None = None) -> None:
        self.large.release(slots, held)

    def describe(self) -> str:
        return f"up to {self.rows} rows: {self.small.describe()}; more rows and prefill: {self.large.describe()}"


class _OneRow:
    """Decoding one sequence through four compiled graphs instead of ~13 kernel calls per block.

    At one row a step is bound by reading the weights (162 MB in bf16 for DistilGPT2), and
    every call between two products (a layer norm, GELU, a residual add: 5-10 us of dispatch
    each) is time the memory bus idles. Chained here, a block is two graph calls around the
    attention: the attention output's product, residual and layer norm with the MLP's first
    product; then the MLP's second product and residual with the next block's layer norm and
    QKV product (or, after the last block, the final norm and the LM head).

    Each layer norm's output is also a graph output: returned, Inductor stores it once; kept
    internal, it inlined the normalisation into the next product's loop over the weight rows
    and recomputed it for every row (2x slower). These graphs run the same compiled products
    that choose_kernels measured faster than F.linear, with fewer calls between them. The
    attention stays a call of its own: folded in too (cache writes as input mutations, the
    span symbolic), the chain was not reliably faster (docs/engine.md#one-row-graphs).
    """

    def __init__(self, fw: GPT2Forward) -> None:
        self.fw, blocks, dev = fw, fw.blocks, fw.device
        self.cols = fw.dim // fw.n_head
        self.first = (fw.wte, fw.wpe, *blocks[0].ln1, blocks[0].qkv.weight, blocks[0].qkv.bias)
        # per block, the weights of its two graphs: the second ends in the next block's QKV, or
        # after the last block in the final norm and the LM head
        nexts = [(*nb.ln1, nb.qkv.weight, nb.qkv.bias) for nb in blocks[1:]] + [(*fw.ln_f, fw.head.weight)]
        self.chains = [_Chain(proj=(b.attn_proj.weight, b.attn_proj.bias, *b.ln2, b.fc.weight, b.fc.bias),
                              mlp=(b.mlp_proj.weight, b.mlp_proj.bias, *nxt)) for b, nxt in zip(blocks, nexts)]
        self.mask = torch.ones(1, 1, fw.cache.keys[0].shape[2], dtype=torch.bool, device=dev)

        # example inputs: distinct tensors (one tensor passed twice would be traced as one input)
        def row(width):
            return torch.randn(1, width, dtype=fw.dtype, device=dev)

        norm = functools.partial(_norm, dim=fw.dim, eps=fw.eps)
        ids, pos = (torch.zeros(1, dtype=torch.long, device=dev) for _ in range(2))
        inner, first, last = blocks[0].fc.weight.shape[0], self.chains[0], self.chains[-1]
        self.embed_qkv = compile_graph(functools.partial(_embed_qkv, norm=norm), [ids, pos, *self.first])
        self.proj_fc = compile_graph(functools.partial(_proj_fc, norm=norm, act=fw.act),
                                     [row(fw.dim), row(fw.dim), *first.proj])
        self.proj_qkv = (compile_graph(functools.partial(_proj_qkv, norm=norm), [row(inner), row(fw.dim), *first.mlp])
                         if len(blocks) > 1 else None)
        self.proj_head = compile_graph(functools.partial(_proj_head, norm=norm), [row(inner), row(fw.dim), *last.mlp])

    def __call__(self, slot: int, token: torch.Tensor) -> torch.Tensor:
        fw, cache = self.fw, self.fw.cache
        p = cache.lengths[slot]
        x, _, qkv = self.embed_qkv(token, torch.tensor([p], device=fw.device), *self.first)
        mask = self.mask[..., :p + 1]
        for layer, chain in enumerate(self.chains):
            q, k, v = qkv.view(1, 3, fw.n_head, self.cols).unbind(1)
            keys, values = cache.keys[layer][slot:slot + 1], cache.values[layer][slot:slot + 1]
            keys[0, :, p], values[0, :, p] = k[0], v[0]
            y = fw.kernels.attention(q, keys[:, :, :p + 1], values[:, :, :p + 1], mask, fw.scale)
            x, _, hidden = self.proj_fc(y.reshape(1, fw.dim), x, *chain.proj)
            if chain is self.chains[-1]:
                _, logits = self.proj_head(hidden, x, *chain.mlp)
            else:
                x, _, qkv = self.proj_qkv(hidden, x, *chain.mlp)
        cache.lengths[slot] += 1
        return logits[:, :fw.vocab]


class _Chain(NamedTuple):
    """One block's weights as its two graphs take them: `proj` (attention output product and
    bias, ln_2, MLP first product and bias), `mlp` (MLP second product and bias, then the next
    block's ln_1 and QKV product and bias, or the final norm and the LM head)."""

    proj: tuple[torch.Tensor, ...]
    mlp: tuple[torch.Tensor, ...]


# The one-row graphs, traced and compiled once each by _OneRow (functions of tensors only: the
# layer norm's size and epsilon and the activation are bound with functools.partial).
def _norm(x, w, b, *, dim: int, eps: float):
    return F.layer_norm(x, (dim,), w, b, eps)


def _residual_norm(h, x, w, b, ln_w, ln_b, norm):
    """x + h W^T + b, and its layer norm (returned too: see _OneRow on why)."""
    x = x + row_product(h, w, b)
    return x, norm(x, ln_w, ln_b)


def _embed_qkv(ids, pos, wte, wpe, ln_w, ln_b, w, b, *, norm):
    x = wte[ids] + wpe[pos]
    n = norm(x, ln_w, ln_b)
    return x, n, row_product(n, w, b)


def _proj_fc(y, x, w, b, ln_w, ln_b, w_fc, b_fc, *, norm, act):
    x, n = _residual_norm(y, x, w, b, ln_w, ln_b, norm)
    return x, n, act(row_product(n, w_fc, b_fc))


def _proj_qkv(h, x, w, b, ln_w, ln_b, w_qkv, b_qkv, *, norm):
    x, n = _residual_norm(h, x, w, b, ln_w, ln_b, norm)
    return x, n, row_product(n, w_qkv, b_qkv)


def _proj_head(h, x, w, b, ln_w, ln_b, w_head, *, norm):
    _, n = _residual_norm(h, x, w, b, ln_w, ln_b, norm)
    return n, row_product(n, w_head, None, torch.float32)
