"""Shared by the benchmarks: the DistilGPT2-shaped model and the machine's matmul peak.

No pretrained weights can be downloaded on our machines; speed does not depend on weight
values, so a randomly initialised model of the exact DistilGPT2 shape (82 M parameters,
config from ../shared/models/gpt2-tokenizer/config-distilgpt2.json) gives true speed figures.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WIKIGPT_SHARED", REPO.parent / "shared"))
TOKENIZER_DIR = SHARED / "models" / "gpt2-tokenizer"


def distilgpt2_shaped(out_dir: Path) -> Path:
    """Save a random-weight DistilGPT2-shaped model with the real GPT-2 tokenizer to out_dir."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

    from wikigpt.modeling import save_model

    config_file = TOKENIZER_DIR / "config-distilgpt2.json"
    if not config_file.is_file():
        sys.exit(f"needs {config_file} (set WIKIGPT_SHARED to the folder holding models/gpt2-tokenizer)")
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_json_file(str(config_file)))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    return save_model(model, tok, out_dir)


def matmul_peak_flops(dtype_name: str = "bfloat16", n: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a square matmul in the given dtype (2 n^3 FLOPs per product)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: oneDNN picks its kernel on the first call
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)
