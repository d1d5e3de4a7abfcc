"""Build and load wikigpt's CPU kernels, torch operators in one library: the int8 product
`wikigpt::q8_linear` (csrc/q8_linear.cpp) and one sequence's decoding attention
`wikigpt::decode_attention` (csrc/attention.cpp).

Built once per (source, torch version, Python) by `make install` (`python -m wikigpt.q8kernel`),
or at first use, into a cache folder; compiled without `-march=native` (each SIMD path carries
its own target attribute, and the CPU's features pick the path at run time), so the cached
library stays right when the same disk meets another CPU. Only torch's headers and a C++
compiler are needed: no ninja, no pybind (the operator is registered with TORCH_LIBRARY and
loaded with `torch.ops.load_library`).

Without a compiler, `unavailable()` says so and int8 serving takes FBGEMM where its 8-bit
activations are exact (quantize.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("wikigpt.engine")

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("q8_linear.cpp", "attention.cpp")]
PATHS = {0: "portable C++", 1: "AVX2", 2: "AVX-512 VNNI"}


def cache_dir() -> Path:
    """$WIKIGPT_KERNEL_DIR, else $XDG_CACHE_HOME/wikigpt/kernels (~/.cache/wikigpt/kernels)."""
    if env := os.environ.get("WIKIGPT_KERNEL_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wikigpt" / "kernels"


def library_path() -> Path:
    sources = b"".join(src.read_bytes() for src in SOURCES)
    key = hashlib.sha256(sources + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / f"wikigpt_kernels-{key}.so"


def _compile(target: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not found; install g++, "
                           "e.g. `apt-get install g++`, then run `make install` again)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]),
           *map(str, SOURCES), *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
           "-lc10", "-ltorch_cpu"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        part = Path(tmp) / target.name
        done = subprocess.run([*cmd, "-o", str(part)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {', '.join(src.name for src in SOURCES)} failed: {done.stderr.strip()[-800:]}")
        part.replace(target)  # atomic: a concurrent loader sees no library or a whole one


def build() -> Path:
    """The compiled library, compiled now if it is not in the cache."""
    target = library_path()
    if not target.exists():
        log.info("compiling wikigpt's kernels %s -> %s", ", ".join(src.name for src in SOURCES), target)
        _compile(target)
    return target


@functools.cache
def load() -> str | None:
    """Load the operator; None where it runs here, else why not (one line)."""
    if os.environ.get("WIKIGPT_Q8_KERNEL", "1") == "0":
        return "turned off by WIKIGPT_Q8_KERNEL=0"
    try:
        torch.ops.load_library(str(build()))
    except Exception as exc:  # no compiler, no headers, a read-only cache: say why, keep serving
        text = str(exc).splitlines()
        return f"{type(exc).__name__}: {text[-1][:300] if text else ''}"
    return None


# torch's own cap on its vectorised kernels (ATEN_CPU_CAPABILITY=avx2 or default) caps ours too:
# with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2 beside it, an AVX-512 machine
# runs every int8 and float product the way an AVX2-only CPU without VNNI does
# (docs/engine.md#int8-weights).
_CAPS = {"default": 0, "avx2": 1}


def paths() -> list[int]:
    """The SIMD paths this CPU runs (keys of PATHS) under ATEN_CPU_CAPABILITY's cap, empty where
    the kernel is unavailable."""
    if load() is not None:
        return []
    bits = int(torch.ops.wikigpt.q8_paths())
    cap = _CAPS.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), max(PATHS))
    return [p for p in PATHS if bits >> p & 1 and p <= cap]


if __name__ == "__main__":  # `make install`: build now, say what was built and what runs here
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    why = load()
    if why:
        print(f"wikigpt kernels not built ({why}); int8 serving uses FBGEMM where it is exact")
    else:
        print(f"wikigpt kernels: {library_path()} (int8 paths here: {', '.join(PATHS[p] for p in paths())})")
