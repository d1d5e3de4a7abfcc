"""The lean GPT-2 forward and its slot-indexed KV cache against transformers' own forward."""

from __future__ import annotations

import asyncio

import pytest
import torch

from wikigpt.engine import Engine
from wikigpt.engine.gpt2 import GPT2Forward, unsupported_reason
from wikigpt.engine.kernels import (Kernels, Linear, choose_kernels, compiled_attention, cpp_decode_attention,
                                    sdpa_decode_attention)
from wikigpt.engine.kv_cache import SlotKVCache
from wikigpt.generation import generate
from wikigpt.decoding import SamplingParams


def lean(lm, slots=4, dtype=torch.float32, kernels=None):
    cfg = lm.model.config
    cache = SlotKVCache(cfg.n_layer, slots, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head, dtype, lm.device)
    return GPT2Forward(lm.model, cache, dtype, kernels or Kernels())


def hf_last_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1].float()


def assert_matches(lm, logits, seqs):
    for row, ids in zip(logits, seqs):
        torch.testing.assert_close(row, hf_last_logits(lm, ids), rtol=1e-4, atol=1e-4)


def test_prefill_and_decode_equal_transformers_logits(tiny_lm):
    """Prompts of different lengths in one prefill, then decoding with a hole in the slots
    (a request that left) and a new request in the freed slot: logits equal HF's in fp32."""
    f = lean(tiny_lm)
    seqs = [[5, 6, 7, 8, 9], [10, 11], [3] * 9]
    with torch.inference_mode():
        slots = [f.allocate() for _ in seqs]
        logits = f.prefill(slots, seqs)
        assert_matches(tiny_lm, logits, seqs)
        for _ in range(3):
            nxt = logits.argmax(-1)
            for s, t in zip(seqs, nxt.tolist()):
                s.append(t)
            logits = f.decode(slots, nxt)
            assert_matches(tiny_lm, logits, seqs)
        f.release([slots[0]])  # slot 0 is now a hole below the running ones
        nxt = logits[1:].argmax(-1)
        for s, t in zip(seqs[1:], nxt.tolist()):
            s.append(t)
        assert_matches(tiny_lm, f.decode(slots[1:], nxt), seqs[1:])
        reused = f.allocate()  # the lowest free slot, with a longer stale row in it before
        assert reused == slots[0]
        logits = f.prefill([reused], [[42, 43]])
        assert_matches(tiny_lm, logits, [[42, 43]])
        nxt = torch.tensor([7, 1, 2])  # decode rows out of slot order
        order = [slots[2], reused, slots[1]]
        seqs = [seqs[2] + [7], [42, 43, 1], seqs[1] + [2]]
        assert_matches(tiny_lm, f.decode(order, nxt), seqs)


def test_cache_hands_out_the_lowest_free_slot():
    cache = SlotKVCache(1, 4, 1, 8, 2, torch.float32, torch.device("cpu"))
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    cache.lengths[1] = 5
    cache.release(1)
    assert cache.lengths[1] == 0 and cache.free_slots == 2
    assert cache.allocate() == 1 and cache.allocate() == 3


def test_packed_linear_equals_plain_linear():
    w, b = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(5, 64)
    try:
        packed = Linear(w, b, Kernels(packed=True))
        got = packed(x)
    except (RuntimeError, AttributeError) as exc:  # not in every torch build: choose_kernels skips it too
        pytest.skip(f"oneDNN packed linear unavailable: {exc}")
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_many_row_products_run_at_few_shapes_and_give_the_plain_numbers(packed, monkeypatch):
    """Prefill-sized products are tiled and padded to a bounded set of row counts (oneDNN keeps
    ~0.6 MB per shape it has seen); every row count still gives F.linear's numbers."""
    from wikigpt.engine import kernels

    w, b = torch.randn(96, 64), torch.randn(96)
    try:
        lin = Linear(w, b, Kernels(packed=packed))
        lin(torch.randn(2, 64))
    except (RuntimeError, AttributeError) as exc:
        pytest.skip(f"oneDNN packed linear unavailable: {exc}")
    seen: set[int] = set()
    product = lin._product
    monkeypatch.setattr(lin, "_product", lambda x: seen.add(x.shape[0]) or product(x))
    for rows in [1, 2, 31, 32, 33, 47, 200, 255, 256, 257, 600, 1000, 4096]:
        x = torch.randn(rows, 64)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)
    allowed = set(range(1, kernels.EXACT_ROWS + 1)) | set(range(kernels.ROW_STEP, kernels.TILE_ROWS + 1, kernels.ROW_STEP))
    assert seen <= allowed and max(seen) == kernels.TILE_ROWS, sorted(seen - allowed)


@pytest.mark.slow
def test_compiled_kernels_give_the_same_numbers(tiny_lm):
    """Inductor-compiled one-row products and attention (Inductor needs a C++ compiler: CI has
    gcc) inside the forward give HF's logits at one row and at several; choose_kernels keeps
    whatever it picks numerically equal."""
    head = tiny_lm.model.get_output_embeddings().weight.detach()
    cfg = tiny_lm.model.config
    x = torch.randn(1, head.shape[1])
    chosen = choose_kernels(head, compile=True, batch=4, heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
                            context=cfg.n_positions)
    if chosen.compiled_gemv:
        torch.testing.assert_close(chosen.gemv(head, None)(x, head, None), x @ head.T, rtol=1e-4, atol=1e-4)
    attention = compiled_attention(torch.float32, 4, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions)
    f = lean(tiny_lm, kernels=Kernels(compiled_gemv=True, attention=attention))
    with torch.inference_mode():
        slot = f.allocate()
        first = f.prefill([slot], [[1, 2, 3]]).argmax(-1)
        assert_matches(tiny_lm, f.decode([slot], first), [[1, 2, 3, int(first)]])
        other = f.allocate()
        second = f.prefill([other], [[4, 5]]).argmax(-1)
        nxt = torch.tensor([7, int(second)])
        assert_matches(tiny_lm, f.decode([slot, other], nxt), [[1, 2, 3, int(first), 7], [4, 5, int(second)]])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_graphs_equal_the_per_op_forward(tiny_lm, dtype):
    """A sequence decoding alone goes through the chained one-row graphs, in any slot (here
    slot 1, slot 0 freed): same logits as the per-op forward, and in fp32 as HF's."""
    attention = compiled_attention(dtype, 4, tiny_lm.model.config.n_head,
                                   tiny_lm.model.config.n_embd // tiny_lm.model.config.n_head,
                                   tiny_lm.model.config.n_positions)
    f = lean(tiny_lm, dtype=dtype, kernels=Kernels(compiled_gemv=True, attention=attention))
    assert f.one_row is not None
    seq = [4, 5, 6]
    with torch.inference_mode():
        slots = [f.allocate() for _ in range(2)]
        f.prefill(slots, [[9, 9], seq])
        f.release([slots[0]])
        one_row, per_op, nxt = [], [], 7
        for _ in range(3):
            seq.append(nxt)
            one_row.append(f.decode([slots[1]], torch.tensor([nxt])))
            f.cache.lengths[slots[1]] -= 1  # the same position again, through the per-op path
            graphs, f.one_row = f.one_row, None
            per_op.append(f.decode([slots[1]], torch.tensor([nxt])))
            f.one_row = graphs
            if dtype == torch.float32:
                assert_matches(tiny_lm, one_row[-1], [seq])
            nxt = int(one_row[-1].argmax())
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(torch.cat(one_row), torch.cat(per_op), **tol)


def test_one_row_graphs_that_fail_to_compile_leave_the_per_op_path(tiny_lm, monkeypatch, caplog):
    """An Inductor failure on the one-row graphs is logged with its reason, and a lone sequence
    then decodes through the per-op forward: still HF's logits."""
    import wikigpt.engine.gpt2 as gpt2

    def broken(fn, example, symbolic=False):
        raise RuntimeError("C++ compile error: injected")

    monkeypatch.setattr(gpt2, "compile_graph", broken)
    with caplog.at_level("WARNING", logger="wikigpt.engine"):
        f = lean(tiny_lm, kernels=Kernels(compiled_gemv=True))
    assert f.one_row is None
    assert "one-row decoding graphs failed to compile (RuntimeError: C++ compile error: injected)" in caplog.text
    with torch.inference_mode():
        slot = f.allocate()
        first = int(f.prefill([slot], [[1, 2, 3]]).argmax())
        assert_matches(tiny_lm, f.decode([slot], torch.tensor([first])), [[1, 2, 3, first]])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_attention_takes_any_rows_and_positions(dtype):
    """One graph per row class serves every row count and position: traced with 32 rows and a
    head size of 32, those two sizes must stay independent (duck shaping would tie them and
    every other row count would fail the graph's size check)."""
    heads, hd, context = 2, 32, 256
    attention = compiled_attention(dtype, hd, heads, hd, context)
    keys, values = torch.randn(2, 32, heads, context, hd, dtype=dtype)
    for n, span in [(1, 1), (1, 33), (2, 4), (5, 70), (32, 32), (7, 256)]:
        q = torch.randn(n, 3, heads, hd, dtype=dtype)[:, 0]
        mask = torch.rand(n, 1, span) < 0.8
        mask[..., 0] = True
        args = (q, keys[:n, :, :span], values[:n, :, :span], mask, hd ** -0.5)
        torch.testing.assert_close(attention(*args), sdpa_decode_attention(*args),
                                   **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_one_row_attention_equals_sdpa(dtype):
    """wikigpt's C++ kernel (csrc/attention.cpp) on the cache's strided views, at every length a
    sequence reaches (1 position, a thread's share, DistilGPT2's full context), masked positions
    skipped, a fully masked row zeros (SDPA gives NaN there), any head size."""
    from wikigpt import q8kernel

    assert q8kernel.load() is None, q8kernel.load()  # built by `make install` (CI has g++)
    for heads, hd, context in [(12, 64, 1024), (3, 24, 64)]:
        keys, values = torch.randn(2, 4, heads, context, hd, dtype=dtype)
        for span in sorted({s for s in (1, 2, 40, 513, context) if s <= context}):
            q = torch.randn(1, 3, heads, hd, dtype=dtype)[:, 0]  # a view of a fused QKV output
            mask = torch.rand(1, 1, span) < 0.8
            mask[..., 0] = True
            args = (q, keys[2:3, :, :span], values[2:3, :, :span], mask, hd ** -0.5)
            got = cpp_decode_attention(*args)
            assert got.dtype == dtype and got.shape == (1, heads, hd)
            torch.testing.assert_close(got, sdpa_decode_attention(*args),
                                       **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    none = torch.zeros(1, 1, 5, dtype=torch.bool)
    assert cpp_decode_attention(q, keys[:1, :, :5], values[:1, :, :5], none, 0.1).abs().max() == 0
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        cpp_decode_attention(q.float() if dtype != torch.float32 else q.double(), keys[:1, :, :5],
                             values[:1, :, :5], mask[..., :5], 0.1)


def test_choose_kernels_keeps_the_fastest_attention_and_says_which(caplog):
    """Every candidate that gives SDPA's numbers is timed; the log names them all with their times."""
    with caplog.at_level("INFO", logger="wikigpt.engine"):
        chosen = choose_kernels(torch.randn(256, 64), compile=False, batch=4, heads=2, head_dim=32, context=128)
    assert "attention, 1 rows: SDPA" in caplog.text and "wikigpt C++" in caplog.text
    assert "compiled" not in caplog.text  # compile=False: no Inductor candidate
    assert chosen.attention.one in (sdpa_decode_attention, cpp_decode_attention)
    assert chosen.attention.many is sdpa_decode_attention  # the C++ kernel serves one row only


_COMPILED_VS_PLAIN = """
import sys, torch
from wikigpt.modeling import load_model
from wikigpt.settings import ModelSettings
from wikigpt.engine.gpt2 import GPT2Forward
from wikigpt.engine.kv_cache import SlotKVCache
from wikigpt.engine.kernels import Kernels, compiled_attention
lm = load_model(ModelSettings(model=sys.argv[1], device="cpu"))
cfg = lm.model.config
outs = []
for kernels in (Kernels(), Kernels(compiled_gemv=True, attention=compiled_attention(
        torch.float32, 4, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions))):
    cache = SlotKVCache(cfg.n_layer, 4, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head, torch.float32, "cpu")
    f = GPT2Forward(lm.model, cache, torch.float32, kernels)
    with torch.inference_mode():
        f.prefill([0], [[1, 2, 3]])
        outs.append(f.decode([0], torch.tensor([5])))
print(float((outs[0] - outs[1]).abs().max()))
"""


@pytest.mark.slow
def test_an_isa_cap_never_reuses_kernels_compiled_without_it(tiny_model_dir, tmp_path):
    """Compiled one-row graphs and attention, first natively and then under ATEN_CPU_CAPABILITY=avx2
    with the same Inductor cache folder: both give the plain forward's logits (torch's cache key
    leaves the capability out, and a reloaded AVX-512 graph built for AVX2 was 0.6 off)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("ATEN_CPU_CAPABILITY", None)
    for extra in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        done = subprocess.run([sys.executable, "-c", _COMPILED_VS_PLAIN, str(tiny_model_dir)], capture_output=True,
                              text=True, timeout=300, env={**env, **extra})
        assert done.returncode == 0, done.stderr[-2000:]
        assert float(done.stdout.split()[-1]) < 1e-4, (extra, done.stdout)


def test_other_architectures_use_the_transformers_forward(tmp_path, tiny_model_dir):
    """A Llama-shaped model is served through hf.py with the same greedy text as generate."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed

    from wikigpt.modeling import load_model, save_model
    from wikigpt.settings import ModelSettings

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    set_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    lm = load_model(ModelSettings(model=str(save_model(LlamaForCausalLM(cfg), tok, tmp_path / "llama")),
                                  device="cpu"))
    assert unsupported_reason(lm.model) is not None
    params = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.2)
    prompts = ["Data science is", "The history of the Roman Empire", "Wikipedia"]
    want = [generate(lm, p, params)[len(p):] for p in prompts]
    eng = Engine(lm, max_batch_size=2).start()  # 3 requests, 2 slots: one joins when one leaves
    try:
        async def main():
            return await asyncio.gather(*[eng.submit(p, params).text() for p in prompts])

        got = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        eng.stop()
    assert eng.info()["forward"] == "HFForward"
    assert got == want


def test_a_vocabulary_padded_for_the_head_gives_the_same_logits():
    """GPT-2's 50,257-row head is padded to a multiple of 64 for oneDNN; the padding's logits
    never reach the caller (a 509-token vocabulary here, padded to 512)."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=509, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    lm = SimpleNamespace(model=model, device=torch.device("cpu"))
    f = lean(lm, slots=2)
    assert f.head.weight.shape[0] == 512
    with torch.inference_mode():
        logits = f.prefill([f.allocate()], [[1, 2, 3]])
    assert logits.shape == (1, 509)
    assert_matches(lm, logits, [[1, 2, 3]])


@pytest.mark.slow
def test_compiled_engine_decodes_a_lone_request_as_transformers_does(tiny_lm, monkeypatch):
    """An engine whose start-up chose the compiled products (as it does for DistilGPT2's head;
    the tiny model's head is too small for them to win, so the choice is made for it here):
    a request decoding alone goes through the one-row graphs, rows switch between them and the
    batched path as requests join and leave (3 requests, 2 slots, different lengths), and every
    greedy text equals transformers' generate in fp32; the lone request's token scores equal
    the per-op forward's (greedy text alone would miss small errors: the tiny random model
    repeats one word); the engine says which path ran."""
    import wikigpt.engine.builder as builder

    def compiled(head, *, compile, batch, heads, head_dim, context):
        return Kernels(compiled_gemv=True, attention=compiled_attention(head.dtype, batch, heads, head_dim, context))

    plain = Engine(tiny_lm, max_batch_size=2).start()  # the per-op forward, built before the patch
    plain.ready.wait(120)
    monkeypatch.setattr(builder, "choose_kernels", compiled)
    prompts = ["The history of the Roman Empire", "Data science is", "Wikipedia"]
    lengths = [12, 5, 9]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0) for n in lengths]
    want = [generate(tiny_lm, p, sp)[len(p):] for p, sp in zip(prompts, params)]

    async def scores(engine):  # the lone request's token log-probabilities: its logits, in effect
        return [t.logprob async for c in engine.submit(prompts[0], params[0], logprobs=1) for t in c.logprobs]

    eng = Engine(tiny_lm, max_batch_size=2, compile=True).start()
    try:
        async def main():
            alone = await eng.submit(prompts[0], params[0]).text()
            together = await asyncio.gather(*[eng.submit(p, sp).text() for p, sp in zip(prompts, params)])
            return [alone, *together], await scores(eng), await scores(plain)

        got, lone_scores, per_op_scores = asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        eng.stop()
        plain.stop()
    assert "chained compiled graphs" in eng.info()["kernels"]
    assert got == [want[0], *want]
    assert len(lone_scores) == lengths[0] and lone_scores == pytest.approx(per_op_scores, abs=1e-4)
