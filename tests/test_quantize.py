"""Int8 weights: the products against a dequantized reference, the engine against an int8
transformers forward, and what the server reports."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from wikigpt.engine import Engine
from wikigpt.engine.gpt2 import GPT2Forward, SplitForward
from wikigpt.engine.kernels import EXACT_ROWS, TILE_ROWS, Kernels, Linear
from wikigpt.engine.kv_cache import SlotKVCache
from wikigpt.generation import generate
from wikigpt import q8kernel
from wikigpt.quantize import Int8Linear, Int8Weight, _fbgemm_pack, _quantize_rows, backends, quantize_model, unavailable
from wikigpt.decoding import SamplingParams

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no int8 products here: {unavailable()}")

# DistilGPT2's products (QKV, attention output, MLP in and out, LM head) and the tiny model's
ENGINE_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768), (192, 64), (256, 64), (64, 256)]
ROWS = [1, 2, 7, EXACT_ROWS, EXACT_ROWS + 1, 100, TILE_ROWS, TILE_ROWS + 44]  # decoding batches, prefills


def _products() -> dict:
    """Every int8 product this machine runs: wikigpt's kernel at each SIMD path the CPU has,
    FBGEMM where its 8-bit activations are exact, and the one Int8Weight serves."""
    found = {f"q8-{q8kernel.PATHS[p]}": (lambda q, x, p=p: torch.ops.wikigpt.q8_linear(
        x.contiguous(), q.q, q.scale, q.bias, p)) for p in q8kernel.paths()}
    if backends().fbgemm_exact:
        found["fbgemm"] = lambda q, x: torch.ops.quantized.linear_dynamic(
            x, _fbgemm_pack(q.q, q.scale, q.bias, q.shape[1]), False)
    found["served"] = lambda q, x: q(x)
    return found


PRODUCTS = _products()


def int8_weight(w: torch.Tensor, b: torch.Tensor | None = None) -> Int8Weight:
    """An Int8Weight that also keeps its int8 rows for the products above to read: where FBGEMM
    wins every row count (AMX Xeons) the served weight drops them and keeps FBGEMM's copy only."""
    q = Int8Weight(w, b)
    if q.q is None:
        q.q = _quantize_rows(w.detach().float())[0]
    return q


def test_wikigpts_kernel_is_built_here():
    """`make install` builds it (a C++ compiler is part of the CI image): the suite must not pass
    on FBGEMM alone and never run the kernel it serves elsewhere."""
    assert q8kernel.load() is None and q8kernel.paths(), q8kernel.load()


@pytest.mark.parametrize("product", sorted(PRODUCTS))
@pytest.mark.parametrize("out_features, in_features", ENGINE_SHAPES)
def test_products_equal_the_dequantized_reference_at_every_engine_shape(out_features, in_features, product):
    """Per-row scales (one row of outliers must not coarsen the others), the bias, and every row
    count the engine runs: within the error of 8-bit activations, far below what a wrong layout,
    scale or transpose would give."""
    run = PRODUCTS[product]
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[0] *= 50  # an outlier row
    b = torch.randn(out_features, generator=g)
    q = int8_weight(w, b)
    w_ref, b_ref = q.dequantized()
    assert (w_ref - w).abs().amax(1).le(w.abs().amax(1) / 127 / 2 * 1.01).all()  # half a step per row
    errors = []
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=g)
        got, want = run(q, x), F.linear(x, w_ref, b_ref)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        errors.append(float((got - want).norm() / want.norm()))
        # against the unrounded weights: the rows beside the outlier keep their own fine scales
        exact = F.linear(x, w, b)[:, 1:]
        assert (got[:, 1:] - exact).norm() / exact.norm() < 0.015
    # 8-bit activations: per block of 32 normal values the step is max|x| / 127 ~ 2.1 / 127;
    # with one scale per call (FBGEMM) 255 steps span the whole range (~7). Measured over these
    # shapes and rows: medians 0.3 % and 0.5 %, worst 1.2 % (the outlier row, 2 rows of 256).
    # 7-bit activations (FBGEMM without VNNI) reach 2.2 % (768 x 3072, 33 rows): red.
    assert max(errors) < 0.015, errors


def test_the_kernels_paths_agree_and_a_row_never_depends_on_its_neighbours():
    """Integer sums per block are exact, so the SIMD paths differ only in the order of float
    additions; and each block has its own activation scale, so a row computed alone and in a
    batch of 33 (tiles of 4 plus a remainder) gives the same bits."""
    g = torch.Generator().manual_seed(1)
    q = int8_weight(torch.randn(300, 3072, generator=g), torch.randn(300, generator=g))
    x = torch.randn(33, 3072, generator=g)
    x[5] *= 100  # an outlier row must not change the others
    outs = [torch.ops.wikigpt.q8_linear(x, q.q, q.scale, q.bias, p) for p in q8kernel.paths()]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-4)
    for p, out in zip(q8kernel.paths(), outs):
        for r in (0, 5, 32):
            assert torch.equal(torch.ops.wikigpt.q8_linear(x[r:r + 1], q.q, q.scale, q.bias, p)[0], out[r])


def test_inputs_that_are_not_a_multiple_of_32_are_padded():
    w, x = torch.randn(10, 70), torch.randn(3, 70)
    q = int8_weight(w)
    assert q.q is None or q.q.shape == (10, 96)
    w_ref, _ = q.dequantized()
    want = F.linear(x, w_ref)
    assert (q(x) - want).norm() / want.norm() < 0.015


def test_activations_never_saturate():
    """The largest pair sums: 8-bit activations at full scale against full-scale weights."""
    w = torch.full((16, 768), 0.5)
    x = torch.full((1, 768), 3.0)
    q = int8_weight(w)
    for name, run in PRODUCTS.items():
        torch.testing.assert_close(run(q, x), x @ w.T, rtol=1e-2, atol=0, msg=name)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with `env` over ours (backends() is measured once per process)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("env", [{"WIKIGPT_Q8_KERNEL": "0"}, {"CXX": "/nonexistent/c++", "PATH": "/nonexistent"}])
def test_without_the_kernel_int8_says_why_and_never_crashes(env, tmp_path):
    """No compiler (an empty kernel cache, no c++ on PATH) or the kernel turned off: FBGEMM
    serves where its 8-bit activations are exact, else int8 is unavailable with the reason."""
    done = _python("from wikigpt import quantize as q; b = q.backends(); "
                   "print(b.q8_why); print(b.describe()); print(q.unavailable())",
                   {"WIKIGPT_KERNEL_DIR": str(tmp_path), **env})
    why, describe, unavailable_ = done.stdout.splitlines()
    assert why != "None" and ("WIKIGPT_Q8_KERNEL" in why or "compiler" in why)
    if backends().fbgemm_exact:
        assert describe == "FBGEMM dynamic int8" and unavailable_ == "None"
        assert "FBGEMM's are used" in done.stderr
    else:
        assert describe == "none" and "no VNNI" in unavailable_


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_an_avx2_cap_runs_int8_as_an_avx2_cpu_without_vnni_does():
    """torch's ISA caps (what docs/engine.md's AVX2 figures were measured under on AVX-512 CPUs):
    FBGEMM's pair sums saturate as without VNNI, so our kernel's AVX2 path serves every row count,
    and its products still equal the dequantized reference within 8-bit rounding."""
    done = _python("import torch; from wikigpt import quantize as q, q8kernel; b = q.backends(); "
                   "print(q8kernel.paths(), b.q8_path, b.fbgemm_exact, b.describe()); "
                   "w = torch.randn(768, 3072); x = torch.randn(33, 3072); i8 = q.Int8Weight(w); "
                   "print(float((i8(x) - x @ i8.dequantized()[0].T).norm() / (x @ w.T).norm()))", AVX2_ONLY)
    facts, error = done.stdout.splitlines()
    assert facts == "[0, 1] 1 False wikigpt q8 kernel (AVX2, int8 activations per block of 32)", facts
    assert float(error) < 0.01  # 8-bit activations per block of 32: 0.5 % on Zen 4; FBGEMM's 7-bit gave 2.2 %


def test_int8_linear_replaces_conv1d_and_linear(tiny_lm):
    model = quantize_model(copy.deepcopy(tiny_lm.model))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Conv1D" not in kinds and "Linear" not in kinds and "Int8Linear" in kinds
    block = tiny_lm.model.transformer.h[0].mlp.c_fc  # Conv1D: [in, out] weights
    x = torch.randn(3, 5, block.weight.shape[0])
    with torch.inference_mode():
        torch.testing.assert_close(Int8Linear(block)(x), block(x), rtol=0.05, atol=0.05)


def _int8_engine_and_reference(lm):
    ref = dataclasses.replace(lm, model=quantize_model(copy.deepcopy(lm.model)))
    return Engine(lm, max_batch_size=4, queue_size=8, quantization="int8").start(), ref


def test_int8_engine_greedy_text_equals_an_int8_transformers_forward(tiny_lm):
    """One sequence at a time (prefill, then one row per step, as the reference runs it): the
    same products on the same rows, so the same tokens."""
    engine, ref = _int8_engine_and_reference(tiny_lm)
    try:
        assert engine.ready.wait(120)
        info = engine.info()
        assert info["quantization"] == "int8" and "int8" in info["kernels"]
        params = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
        for prompt in ("Data science is", "The history of the Roman Empire covers"):
            async def complete(prompt=prompt):
                return await engine.submit(prompt, params).text()

            got = asyncio.run(complete())
            assert got == generate(ref, prompt, params)[len(prompt):]
    finally:
        engine.stop()


def test_int8_forward_logits_stay_close_to_full_precision(tiny_lm):
    cfg = tiny_lm.model.config
    cache = SlotKVCache(cfg.n_layer, 2, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head, torch.float32, "cpu")
    full = GPT2Forward(tiny_lm.model, cache, torch.float32, Kernels())
    int8 = GPT2Forward(tiny_lm.model, cache, torch.float32, Kernels(int8=True))
    assert isinstance(int8.head, Linear) and int8.head.weight is None  # only the int8 copy is kept
    ids = [[5, 6, 7, 8, 9, 10, 11]]
    with torch.inference_mode():
        a = full.prefill([0], ids)
        b = int8.prefill([1], ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decoding_at_every_row_count_matches_separate_norm_and_add_calls(tiny_lm, dtype):
    """The layer norm and residual add run inside the int8 call (our kernel) or beside it
    (FBGEMM, above the row count ours serves); both must equal the separate calls, in float32
    and with a bf16 model (bf16 norms and residuals, float32 products)."""
    cfg = tiny_lm.model.config
    cache = SlotKVCache(cfg.n_layer, 9, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head, dtype, "cpu")
    fw = GPT2Forward(tiny_lm.model, cache, dtype, Kernels(int8=True))
    head = fw.head
    with torch.inference_mode():
        for rows in (1, 2, 8):
            x = torch.randn(rows, cfg.n_embd).to(dtype)
            res = torch.randn(rows, head.int8.shape[0]).to(dtype)
            ln = tuple(t.to(dtype) for t in fw.ln_f)
            separate = head(F.layer_norm(x.float(), (cfg.n_embd,), *(t.float() for t in ln), fw.eps)) + res.float()
            torch.testing.assert_close(head.fused(x, ln, fw.eps, res), separate, rtol=0.02, atol=0.02)
            slots = [fw.allocate() for _ in range(rows)]
            fw.prefill(slots, [[5, 6, 7]] * rows)
            assert torch.isfinite(fw.decode(slots, torch.tensor([8] * rows))).all()
            fw.release(slots)


def test_auto_keeps_the_faster_forward_and_says_so(tiny_lm):
    engine = Engine(tiny_lm, max_batch_size=2, queue_size=2, quantization="auto").start()
    try:
        assert engine.ready.wait(120)
        info = engine.info()
    finally:
        engine.stop()
    import re

    int8_ms, full_ms = map(float, re.search(r"rows int8/float32 ms: 1 ([\d.]+)/([\d.]+)", info["kernels"]).groups())
    assert info["quantization"] == ("int8" if int8_ms < full_ms else "none")


def test_a_split_forward_decodes_few_rows_in_int8_and_more_in_full_precision(tiny_lm):
    cfg = tiny_lm.model.config
    cache = SlotKVCache(cfg.n_layer, 3, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head, torch.float32, "cpu")
    full = GPT2Forward(tiny_lm.model, cache, torch.float32, Kernels())
    int8 = GPT2Forward(tiny_lm.model, cache, torch.float32, Kernels(int8=True))
    split = SplitForward(int8, full, rows=1)
    with torch.inference_mode():
        slots = [split.allocate(), split.allocate()]
        split.prefill(slots, [[5, 6, 7], [8, 9, 10]])
        lengths = list(cache.lengths)
        one = split.decode(slots[:1], torch.tensor([11]))
        cache.lengths[:] = lengths
        assert torch.equal(one, int8.decode(slots[:1], torch.tensor([11])))
        cache.lengths[:] = lengths
        two = split.decode(slots, torch.tensor([11, 12]))
        cache.lengths[:] = lengths
        assert torch.equal(two, full.decode(slots, torch.tensor([11, 12])))
        assert not torch.equal(one[0], two[0])


def test_the_server_and_a_gateway_in_front_say_int8_is_served(tiny_model_dir, tmp_path):
    """`wikigpt serve --quantization int8` over real HTTP: `/` and `/v1/models` report it,
    completions run on it, and a gateway in front passes the upstream's report on."""
    import httpx

    from benchmarks.common import ServerProcess

    with ServerProcess(["--model", str(tiny_model_dir), "--quantization", "int8"], tmp_path / "up.log") as up, \
            ServerProcess(["--upstream", up.url], tmp_path / "gw.log") as gw:
        root = httpx.get(up.url + "/").json()
        card = httpx.get(up.url + "/v1/models").json()["data"][0]
        assert root["quantization"] == card["quantization"] == "int8" and "int8" in root["kernels"]
        done = httpx.post(up.url + "/v1/completions", json={"prompt": "Data science is", "max_tokens": 4,
                                                            "temperature": 0}).json()
        assert done["usage"]["completion_tokens"] == 4
        assert httpx.get(gw.url + "/").json()["quantization"] == "int8"


def test_other_architectures_get_int8_when_asked_and_match_an_int8_transformers_forward(tmp_path, tiny_model_dir):
    """A Llama-shaped model (transformers' forward, hf.py) with --quantization int8: every
    nn.Linear int8, one sequence's greedy text equal to the same int8 model's `generate`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed

    from wikigpt.modeling import load_model, save_model
    from wikigpt.settings import ModelSettings

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    set_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    lm = load_model(ModelSettings(model=str(save_model(LlamaForCausalLM(cfg), tok, tmp_path / "llama")), device="cpu"))
    engine, ref = _int8_engine_and_reference(lm)
    try:
        assert engine.ready.wait(120)
        assert engine.info()["forward"] == "HFForward" and engine.info()["quantization"] == "int8"
        params = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)

        async def complete():
            return await engine.submit("Data science is", params).text()

        assert asyncio.run(complete()) == generate(ref, "Data science is", params)[len("Data science is"):]
        assert not any(isinstance(m, torch.nn.Linear) for m in engine.forward.model.modules())
    finally:
        engine.stop()


@pytest.mark.parametrize("s", [32.0, 20.0])
def test_quant_bench_outlier_rescale_keeps_the_float32_logits(s):
    """benchmarks/quant_bench.py's outlier model: the same function, with the outlier channels
    of every product input s times larger and the other channels unchanged."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    from benchmarks.quant_bench import OUTLIER_CHANNELS, add_outliers

    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # trained layer norms: gains and biases away from 1 and 0
        for ln in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0, 0.1)
    outliers = add_outliers(copy.deepcopy(model), s)
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    inputs = {}
    for key, m in (("before", model), ("after", outliers)):
        for i, block in enumerate(m.transformer.h):
            for name, product in (("c_attn", block.attn.c_attn), ("c_fc", block.mlp.c_fc)):
                product.register_forward_pre_hook(lambda _, a, k=(key, i, name): inputs.__setitem__(k, a[0]))
    with torch.inference_mode():
        ref, got = model(ids).logits, outliers(ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    channels = sorted({c % 64 for c in OUTLIER_CHANNELS})
    others = [c for c in range(64) if c not in channels]
    for (key, i, name), after in inputs.items():
        if key == "after":
            before = inputs["before", i, name]
            torch.testing.assert_close(after[..., channels], s * before[..., channels], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(after[..., others], before[..., others], rtol=1e-5, atol=1e-5)
