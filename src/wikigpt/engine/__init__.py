"""The serving engine, the only serving code that touches torch.

- core.py: the scheduler: the queue, the worker thread and the decoding step (continuous batching);
- builder.py: the forward it drives, with dtype, kernels and int8 weights chosen by measurement;
- request.py: a request inside the engine and the stream its caller reads;
- detokenizer.py: one request's detokenization and text filtering;
- sampling.py: per-row sampling with per-request generators;
- gpt2.py, kv_cache.py, kernels.py: the lean GPT-2 forward on a slot-indexed KV cache;
- hf.py: the transformers forward, for every other causal LM.
"""

from .core import Engine, RequestStream
from .detokenizer import Chunk, Detokenizer, TokenLogprob

__all__ = ["Chunk", "Engine", "Detokenizer", "RequestStream", "TokenLogprob"]
