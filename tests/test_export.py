"""`wikigpt export --format gguf`: the file read back with gguf's own reader, then served by
llama.cpp's real server (`make llama-server`; .ci/run builds it): its greedy tokens from f32
equal transformers', and `wikigpt serve --upstream` in front of it serves /predict, chat and
the web UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import REPO, free_port, make_tiny_model, require
from tests.test_gateway import gateway
from wikigpt.textfilter import clean_continuation

WIKIGPT = [sys.executable, "-m", "wikigpt.cli"]
LLAMA_SERVER = Path(os.environ.get("WIKIGPT_LLAMA_SERVER", REPO / ".llama.cpp" / "build" / "bin" / "llama-server"))
PROMPTS = ["Data science is", "Wikipedia is a free online", " = Data science =\n", " = Valkyria Chronicles III = \n"]


def export(model, *args) -> subprocess.CompletedProcess:
    return subprocess.run(WIKIGPT + ["export", str(model), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Head size 64; weights 5x GPT-2's initial spread, so greedy text is not one token repeated
    and its top-2 logits are far apart (checked: no near-tie for two kernels to break apart)."""
    return make_tiny_model(tmp_path_factory.mktemp("export") / "tiny", n_embd=128, initializer_range=0.1)


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    for outtype in ("f32", "f16", "q8_0"):
        r = export(model_dir, "--outtype", outtype, "-o", str(out / f"tiny-{outtype}.gguf"))
        assert r.returncode == 0, r.stderr
    return out


def greedy(model_dir, prompt: str, n: int) -> tuple[list[int], list[int], float]:
    """(prompt ids, greedy continuation ids, smallest top-1 - top-2 logit gap) from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt).input_ids
    with torch.no_grad():
        # plain greedy: the saved generation_config's repetition penalty (save_model's defaults) left out
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tok.eos_token_id, eos_token_id=None)[0, len(ids):].tolist()
        top = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].topk(2).values
    return ids, out, float((top[:, 0] - top[:, 1]).min())


def test_the_file_holds_llama_cpps_names_types_tokenizer_and_the_weights(model_dir, files):
    import gguf
    from safetensors.torch import load_file

    hf = load_file(str(model_dir / "model.safetensors"))
    for outtype, matrix in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")):
        r = gguf.GGUFReader(files / f"tiny-{outtype}.gguf")
        field = lambda k: r.fields[k].contents()  # noqa: E731
        assert field("general.architecture") == "gpt2" and field("general.name") == "tiny"
        assert (field("gpt2.block_count"), field("gpt2.embedding_length"), field("gpt2.context_length")) == (2, 128, 256)
        assert field("gpt2.attention.head_count") == 2 and field("gpt2.feed_forward_length") == 512
        assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
        tokens = field("tokenizer.ggml.tokens")
        assert tokens[0] == "<|endoftext|>" and field("tokenizer.ggml.token_type")[0] == gguf.TokenType.CONTROL
        assert field("tokenizer.ggml.eos_token_id") == 0 and field("tokenizer.ggml.add_bos_token") is False
        assert len(field("tokenizer.ggml.merges")) > 100
        tensors = {t.name: t for t in r.tensors}
        assert "output.weight" not in tensors  # tied to token_embd, which llama.cpp reuses
        assert len(tensors) == 2 + 12 * 2 + 2
        assert tensors["blk.0.attn_qkv.weight"].tensor_type.name == matrix
        assert tensors["position_embd.weight"].tensor_type.name == "F32"  # never quantized
        assert tensors["blk.1.ffn_norm.bias"].tensor_type.name == "F32"
        # Conv1D [in, out] stored as [out, in]: dequantized, it is the HF weight transposed
        qkv = gguf.quants.dequantize(tensors["blk.0.attn_qkv.weight"].data, tensors["blk.0.attn_qkv.weight"].tensor_type)
        want = hf["transformer.h.0.attn.c_attn.weight"].t().numpy()
        # f32 exact; f16 within its 11-bit mantissa; q8_0 within half a step of its block's scale (max |w| / 127)
        tol = {"f32": 0, "f16": 1e-3 * np.abs(want).max(), "q8_0": np.abs(want).max() / 127}[outtype]
        assert qkv.shape == want.shape and np.abs(qkv - want).max() <= tol
    sizes = {t: (files / f"tiny-{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    modelfile = (files / "tiny-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n") and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.8" in modelfile and "PARAMETER num_ctx 256" in modelfile
    assert "PARAMETER min_p 0.0" in modelfile and "PARAMETER repeat_penalty 1.1" in modelfile
    q8 = gguf.GGUFReader(files / "tiny-q8_0.gguf").fields
    assert q8["general.sampling.temp"].contents() == pytest.approx(0.8)
    assert q8["general.sampling.top_k"].contents() == 50 and q8["general.sampling.min_p"].contents() == 0.0


def test_a_greedy_model_is_exported_greedy():
    """transformers says greedy with do_sample false; llama.cpp and Ollama would sample by default.
    A knob the model's config leaves unset is exported as transformers' generate fills it in."""
    from transformers import GenerationConfig

    from wikigpt.export import modelfile, sampling_defaults

    greedy = GenerationConfig(do_sample=False, repetition_penalty=1.2)
    assert sampling_defaults(greedy) == {"temperature": 0.0, "repetition_penalty": 1.2}
    assert "PARAMETER temperature 0.0\nPARAMETER repeat_penalty 1.2" in modelfile("m.gguf", greedy, None, 64)
    # a knob the config leaves unset is what transformers' generate uses for it, not our default
    assert sampling_defaults(GenerationConfig()) == {"temperature": 0.0, "repetition_penalty": 1.0}
    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.7)) == {
        "temperature": 0.7, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}


def test_what_cannot_be_exported_is_refused_clearly(tmp_path, model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from wikigpt.modeling import load_tokenizer, save_model

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    llama = save_model(LlamaForCausalLM(cfg), load_tokenizer(str(model_dir)), tmp_path / "llama")
    for args, says in (([str(llama)], "GGUF export covers GPT-2-family models; this one is a 'llama'"),
                       ([str(model_dir), "-o", str(tmp_path / "x.bin")], "a GGUF file's name ends in .gguf"),
                       ([str(tmp_path / "nothing")], "no such directory")):
        r = subprocess.run(WIKIGPT + ["export", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))  # no partial file left


CONVERTER = REPO / ".llama.cpp" / "src" / "vendor" / "llama.cpp"  # unpacked by `make llama-server`


@pytest.mark.slow
def test_the_tensors_are_byte_identical_to_llama_cpps_own_converter(shared_tokenizer_dir, tmp_path):
    """The real GPT-2 tokenizer (50,257 tokens, its merges) on a small model, exported by us and
    by llama.cpp's convert_hf_to_gguf.py in q8_0: every tensor and the tokenizer are the same."""
    import json

    import gguf
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

    from wikigpt.modeling import save_model

    require((CONVERTER / "convert_hf_to_gguf.py").is_file(), f"llama.cpp's converter not found in {CONVERTER} "
                                                             "(`make llama-server` unpacks it)")
    set_seed(0)
    model_dir = save_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128)),
                           AutoTokenizer.from_pretrained(shared_tokenizer_dir), tmp_path / "small")
    assert export(model_dir, "--outtype", "q8_0", "-o", str(tmp_path / "ours.gguf")).returncode == 0
    # its GPT2Model reads `n_ctx`, which transformers 5 no longer writes: given to it in a copy
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    for f in model_dir.iterdir():
        (theirs_dir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model_dir / "config.json").read_text())
    (theirs_dir / "config.json").write_text(json.dumps(cfg | {"n_ctx": cfg["n_positions"]}))
    r = subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(theirs_dir), "--outtype", "q8_0",
                        "--outfile", str(tmp_path / "theirs.gguf")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")})
    assert r.returncode == 0, r.stderr[-3000:]
    ours, theirs = gguf.GGUFReader(tmp_path / "ours.gguf"), gguf.GGUFReader(tmp_path / "theirs.gguf")
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "gpt2.context_length",
                "general.file_type", "general.sampling.temp", "general.sampling.penalty_repeat"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


class LlamaServer:
    def __init__(self, gguf_file: Path, log: Path, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(gguf_file), "--host", "127.0.0.1", "--port",
                                      self.url.rsplit(":", 1)[1], "-np", "2", "-t", "2", "-c", "512",
                                      # its KV cache is f16 by default: f32 keeps an f32 file exact
                                      "--cache-type-k", "f32", "--cache-type-v", "f32", *flags],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "llama-server exited:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "llama-server not ready in 60 s:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def complete(self, prompt: str, n: int) -> dict:
        """Plain greedy: the file's own repetition penalty (general.sampling.*, its default) off."""
        r = httpx.post(self.url + "/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, "repeat_penalty": 1.0,
                                                       "return_tokens": True, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        from tests.test_ui_browser import stop

        stop(self.proc)  # SIGTERM, then SIGKILL after 20 s


@pytest.fixture(scope="module")
def llama(files, tmp_path_factory):
    require(os.access(LLAMA_SERVER, os.X_OK), f"no llama.cpp server at {LLAMA_SERVER} (`make llama-server`; "
                                              ".ci/run builds it; or set WIKIGPT_LLAMA_SERVER)")
    server = LlamaServer(files / "tiny-f32.gguf", tmp_path_factory.mktemp("llama") / "llama.log")
    yield server
    server.close()


def test_llama_cpp_tokenizes_and_continues_the_f32_file_as_transformers_does(llama, model_dir):
    for prompt in PROMPTS:
        ids, ours, gap = greedy(model_dir, prompt, 24)
        assert gap > 1e-3, f"{prompt!r}: a near-tie in the fixture's logits ({gap})"
        assert len(set(ours)) > 2, "the fixture model repeats one token: a weak comparison"
        tokens = httpx.post(llama.url + "/tokenize", json={"content": prompt}).json()["tokens"]
        assert tokens == ids
        assert llama.complete(prompt, 24)["tokens"] == ours, prompt


def test_llama_cpp_serves_the_f16_and_q8_0_files(files, model_dir, tmp_path):
    require(os.access(LLAMA_SERVER, os.X_OK), f"no llama.cpp server at {LLAMA_SERVER}")
    _, ours, _ = greedy(model_dir, PROMPTS[0], 16)
    for outtype in ("f16", "q8_0"):
        # --no-repack: llama.cpp's own repacking of q8_0 weights crashes (SIGSEGV) on our AMX Xeon
        # with its converter's file of the same model too (docs/sharing.md)
        server = LlamaServer(files / f"tiny-{outtype}.gguf", tmp_path / f"{outtype}.log", "--no-repack")
        try:
            got = server.complete(PROMPTS[0], 16)["tokens"]
            meta = httpx.get(server.url + "/v1/models").json()["data"][0]["meta"]
        finally:
            server.close()
        assert len(got) == 16 and meta["n_ctx_train"] == 256 and meta["n_embd"] == 128
        assert sum(a == b for a, b in zip(got, ours)) >= 8, (outtype, got, ours)  # rounding may fork late


def test_the_gateway_in_front_of_llama_cpp_serves_predict_and_chat(llama, model_dir):
    srv = gateway(llama.url)
    try:
        # the original call, no Content-Type; greedy so llama.cpp's answer can be compared
        r = httpx.post(srv.url + "/predict", content=b'{"text":"Data Science is","temperature":0,"max_new_tokens":16}',
                       timeout=60)
        assert r.status_code == 200, r.text
        direct = httpx.post(llama.url + "/v1/completions", json={"prompt": "Data Science is", "max_tokens": 16,
                                                                 "temperature": 0}).json()["choices"][0]["text"]
        assert r.json()["predictions"] == "Data Science is" + clean_continuation(direct)
        # the repetition penalty reaches llama.cpp under its own name (it ignores vLLM's)
        answers = []
        for penalty in (1.0, 2.0):
            via = httpx.post(srv.url + "/predict", json={"text": "The history of", "temperature": 0, "max_new_tokens": 24,
                                                         "repetition_penalty": penalty}, timeout=60).json()
            direct = httpx.post(llama.url + "/v1/completions", json={
                "prompt": "The history of", "max_tokens": 24, "temperature": 0, "repeat_penalty": penalty}).json()
            assert via["predictions"] == "The history of" + clean_continuation(direct["choices"][0]["text"])
            answers.append(via["predictions"])
        assert answers[0] != answers[1]
        root = httpx.get(srv.url + "/").json()
        assert root["ready"] is True and root["context_length"] == 256 and root["upstream"] == llama.url
        chat = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                                  "max_tokens": 8, "temperature": 0}, timeout=60)
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"
        assert chat.json()["usage"]["completion_tokens"] >= 1
    finally:
        srv.close()


@pytest.mark.browser
def test_the_web_ui_answers_through_the_gateway_and_llama_cpp(llama, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, start, stop

    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    api_url, ui_port = f"http://127.0.0.1:{free_port()}", free_port()
    api = start(["serve", "--upstream", llama.url, "--host", "127.0.0.1", "--port", api_url.rsplit(":", 1)[1]],
                tmp_path / "api.log", api_url + "/ready")
    ui = None
    try:
        ui = start(["ui", "--api-url", api_url, "--port", str(ui_port), "--status-interval", "1"],
                   tmp_path / "ui.log", f"http://127.0.0.1:{ui_port}/_stcore/health", timeout=60)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{ui_port}")
                expect(page.get_by_text("Backend ready")).to_be_visible(timeout=30_000)
                box = page.get_by_test_id("stChatInputTextArea")
                box.fill("Data Science is")
                box.press("Enter")
                answer = page.get_by_test_id("stChatMessage").last
                expect(answer).to_contain_text("tokens in", timeout=60_000)
                assert answer.get_by_test_id("stMarkdownContainer").first.inner_text().startswith("Data Science is")
                assert "Traceback" not in page.content()
                page.screenshot(path=tmp_path / "ui-llama-cpp.png")
            finally:
                browser.close()
    finally:
        for proc in (ui, api):
            if proc is not None:
                stop(proc)
