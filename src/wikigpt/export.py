"""`wikigpt export MODEL --format gguf`: a GPT-2-family model as one GGUF file, the format of
llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

Written with `gguf`, the ggml project's own writer on PyPI, the way llama.cpp's converter
(convert_hf_to_gguf.py, its GPT2Model) writes GPT-2, so llama.cpp reads it as one of its own:
- tensor names from gguf's own map (transformer.h.0.attn.c_attn -> blk.0.attn_qkv); GPT-2's
  Conv1D weights are stored [in, out] and are transposed to the [out, in] of every other model;
- no `output.weight` when the head is tied to the token embedding: llama.cpp then reuses
  token_embd, as the converter relies on (the safetensors hold one copy too);
- 1-D tensors (norms, biases) and the position embedding stay float32 in every outtype, as the
  converter keeps them; q8_0 is 32 int8 values and one f16 scale per block, 34 bytes for 32
  weights (1.06 bytes a weight against 4 for f32: DistilGPT2's 82 M weights take ~88 MB);
- the tokenizer as the converter writes a byte-level BPE: `gpt2` model, `gpt-2` pre-tokenizer,
  the token strings by id (added tokens as CONTROL), the merges and the special ids (gguf's own
  SpecialVocab reads them from the tokenizer files, as the converter does).

The Modelfile carries the model's own decoding defaults (its generation_config.json) and no
chat template: a base model continues text, so Ollama passes the prompt through as is.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from .decoding import KNOBS, SamplingParams
from .errors import ConfigError
from .files import atomic_path, write_atomic
from .settings import ExportSettings, ModelSettings

log = logging.getLogger("wikigpt.export")

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
# Tensors llama.cpp's converter never quantizes (its prepare_tensors): 1-D ones are caught by shape.
KEEP_F32 = ("position_embd.weight",)


def model_name(model: str) -> str:
    """The model folder's name (its run's, for RUN/final), or the Hub repository's."""
    path = Path(model.rstrip("/"))
    return (path.parent.name if path.name == "final" and path.parent.name else path.name) or "model"


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their gguf types, as the converter's get_vocab_base lists them."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # an embedding row no token uses (a vocabulary padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in added else gguf.TokenType.NORMAL)
    return tokens, types


def _check_tokenizer(tokenizer) -> None:
    """llama.cpp's `gpt-2` pre-tokenizer is GPT-2's regex split with no prefix space: a
    tokenizer that splits otherwise would tokenize differently there, so it is refused."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("model") or {}).get("type") != "BPE" or pre.get("type") != "ByteLevel" \
            or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise ConfigError("GGUF export takes GPT-2's byte-level BPE tokenizer (ByteLevel pre-tokenizer, "
                          f"no prefix space); this model's is {(spec.get('model') or {}).get('type')} with "
                          f"pre-tokenizer {pre.get('type')}")


def write_gguf(model, tokenizer, path: Path, outtype: str, name: str) -> dict[str, int]:
    """Write `model` (a transformers GPT-2) to `path`; returns how many tensors took each type."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "gpt2":
        raise ConfigError(f"GGUF export covers GPT-2-family models; this one is a {cfg.model_type!r}")
    _check_tokenizer(tokenizer)
    ftype = getattr(gguf.LlamaFileType, FILE_TYPES[outtype])
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(sum(p.numel() for p in model.parameters()), 0, 0, 0))
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for knob, value in sampling_defaults(model.generation_config).items():  # llama.cpp's server's defaults
        add = writer.add_int32 if isinstance(value, int) else writer.add_float32
        add(f"general.sampling.{KNOBS[knob].gguf}", value)

    tokens, types = _vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as files:  # SpecialVocab reads merges and ids from the files
        tokenizer.save_pretrained(files)
        special = gguf.SpecialVocab(files, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", False)  # GPT-2 adds nothing; llama.cpp would guess
    special.add_special_token.setdefault("eos", False)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        special.special_token_ids.pop("pad", None)  # our loader's pad = EOS is no token of the model's
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and hf_name == "lm_head.weight"):
            continue  # the causal mask buffers; the tied head (see the module's docstring)
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ConfigError(f"GGUF export: no GPT-2 tensor name for {hf_name}")
        data = tensor.detach().float().cpu()
        if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.t()  # Conv1D [in, out] -> [out, in]
        data = np.ascontiguousarray(data.numpy())
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim > 1 and new_name not in KEEP_F32 and outtype != "f32":
            qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of 32: the converter's fallback
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(new_name, packed, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def sampling_defaults(generation_config) -> dict:
    """A model's decoding defaults by knob, as llama.cpp and Ollama take them: greedy is
    temperature 0 (transformers says it with do_sample false, and their default is to sample)."""
    params = SamplingParams.from_generation_config(generation_config)
    return ({"temperature": 0.0} if params.greedy else {}) | params.knobs(effective=True)


def modelfile(gguf_name: str, generation_config, eos: str | None, context: int) -> str:
    """An Ollama Modelfile for the file: the model's decoding defaults, its end-of-text token as
    the stop, the raw prompt as the template (a base model has no chat format)."""
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""', f"PARAMETER num_ctx {context}"]
    lines += [f"PARAMETER {KNOBS[knob].llama_cpp} {value}" for knob, value in sampling_defaults(generation_config).items()]
    if eos:
        lines.append(f"PARAMETER stop {json.dumps(eos)}")
    return "\n".join(lines) + "\n"


def run(s: ExportSettings) -> int:
    from .modeling import load_model

    out = Path(s.output).expanduser() if s.output else Path(f"{model_name(s.model)}-{s.outtype}.gguf")
    if out.suffix != ".gguf":
        raise ConfigError(f"--output {out}: a GGUF file's name ends in .gguf")
    lm = load_model(ModelSettings(model=s.model, revision=s.revision, device="cpu", dtype="float32"))
    with atomic_path(out) as tmp:
        counts = write_gguf(lm.model, lm.tokenizer, tmp, s.outtype, model_name(s.model))
    mf = out.with_suffix(".Modelfile")
    write_atomic(mf, modelfile(out.name, lm.model.generation_config, lm.tokenizer.eos_token, lm.context_length))
    size = out.stat().st_size
    print(f"wikigpt export: wrote {out} ({size / 1e6:,.1f} MB; tensors: "
          f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}) and {mf}\n"
          f"  llama.cpp: llama-server -m {out}\n  Ollama:    ollama create {out.stem} -f {mf}", file=sys.stderr)
    return 0
