"""How to pick each next token: the one declaration of the decoding settings.

`SamplingParams` is what the CLI, the engine, the API schemas and the UI share. A field that
shapes the next-token distribution (a *knob*) carries a `Knob` beside its bounds: its name in
the UI, in llama.cpp's server and in the formats we write (GGUF, Ollama's Modelfile). Everything else derives from
the declaration: the OpenAI request schema (api/protocol.py), the upstream request
(api/upstream.py: vLLM takes the field names, llama.cpp its own), transformers' GenerationConfig
(`generation_config`), the UI's sidebar, the GGUF sampling keys. Adding a knob is two edits:
its field here, its arithmetic in engine/sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Knob:
    """A decoding knob's names and range outside the engine."""

    label: str
    """Its name in the UI and in text (`describe`)."""
    ui: tuple[float, float, float]
    """The UI control's range and step (narrower than the API's bounds: the useful part)."""
    gguf: str
    """llama.cpp's `general.sampling.<key>` (GGUF metadata; its server's defaults)."""
    llama_cpp: str
    """Its name in llama.cpp's server requests, which Ollama's Modelfile `PARAMETER` shares."""
    off: float | None = None
    """The value that disables it (left out of `describe`)."""
    sampled_only: bool = True
    """Meaningless when decoding greedily (transformers rejects it in a greedy config)."""


class SamplingParams(BaseModel):
    """How to pick each next token. Shared by the CLI, the engine and the API schemas.

    Defaults: nucleus sampling at temperature 0.8 (the original project decoded greedily and
    its output degenerated into pages of newlines); temperature 0 means greedy.
    """

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=4096)
    """Most tokens to generate after the prompt."""
    temperature: Annotated[float, Knob("temperature", (0.0, 2.0, 0.05), "temp", "temperature", off=1.0)] = Field(
        0.8, ge=0.0, le=5.0)
    """Softmax temperature; 0 decodes greedily (deterministic)."""
    top_p: Annotated[float, Knob("top-p", (0.05, 1.0, 0.05), "top_p", "top_p", off=1.0)] = Field(0.95, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to this."""
    top_k: Annotated[int, Knob("top-k", (0, 1000, 1), "top_k", "top_k", off=0)] = Field(50, ge=0, le=100_000)
    """Keep only the k most likely tokens (0 disables the cut)."""
    min_p: Annotated[float, Knob("min-p", (0.0, 0.5, 0.01), "min_p", "min_p", off=0.0)] = Field(0.0, ge=0.0, le=1.0)
    """Drop tokens less likely than this fraction of the most likely one (after temperature;
    0 disables it). Unlike top-p it keeps more tokens when the model is unsure."""
    repetition_penalty: Annotated[float, Knob("repetition penalty", (1.0, 2.0, 0.05), "penalty_repeat",
                                              "repeat_penalty", off=1.0, sampled_only=False)] = Field(1.1, ge=1.0, le=2.0)
    """Divide the logits of tokens already present by this (1.0 disables it). 1.1 is mild: the
    smallest penalty that removes most repeated phrases, so the text departs least from what
    the model finds likely (the measurement: docs/serving.md#decoding-defaults)."""
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    """Random seed; the same seed, prompt and settings give the same text."""
    stop: list[str] = Field(default_factory=list, max_length=16)
    """Stop strings: generation ends before the first occurrence of any of them."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def knobs(self, *, effective: bool = False) -> dict[str, Any]:
        """The knobs' values by field name (also vLLM's, llama.cpp's and transformers' names).
        effective: leave out those greedy decoding ignores."""
        return {name: getattr(self, name) for name, knob in KNOBS.items()
                if not (effective and self.greedy and knob.sampled_only)}

    def describe(self) -> str:
        """The knobs in effect in words, e.g. 'temperature 0.8, top-p 0.95, top-k 50, repetition
        penalty 1.1', or 'greedy, repetition penalty 1.1' (a knob at its `off` value is left out)."""
        words = ["greedy"] if self.greedy else []
        words += [f"{KNOBS[k].label} {v:g}" for k, v in self.knobs(effective=True).items()
                  if v != KNOBS[k].off and not (self.greedy and k == "temperature")]
        return ", ".join(words)

    def generation_config(self, tokenizer) -> Any:
        """transformers' GenerationConfig for these settings (`generate`, generation_config.json)."""
        from transformers import GenerationConfig

        extra = {"stop_strings": list(self.stop)} if self.stop else {}
        return GenerationConfig(
            do_sample=not self.greedy, max_new_tokens=self.max_new_tokens, **self.knobs(effective=True), **extra,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id)

    @classmethod
    def from_generation_config(cls, config) -> SamplingParams:
        """What a transformers GenerationConfig decodes with, as ours: a knob it leaves unset
        takes the value `generate` fills in for it (transformers' defaults, else the knob's
        `off`), not our defaults; greedy when it does not sample. Not validated against our
        request bounds: these are the model's own settings, carried over as they are."""
        filled = getattr(type(config), "_get_default_generation_params", dict)()  # what generate fills in
        values = {}
        for name, knob in KNOBS.items():
            value = getattr(config, name, None)
            value = filled.get(name, knob.off) if value is None else value
            if value is not None:
                values[name] = value
        if not getattr(config, "do_sample", False):
            values["temperature"] = 0.0
        return cls.model_construct(**values)


KNOBS: dict[str, Knob] = {
    name: next(m for m in field.metadata if isinstance(m, Knob))
    for name, field in SamplingParams.model_fields.items() if any(isinstance(m, Knob) for m in field.metadata)
}
"""The knob fields in declaration order (the order the UI shows them)."""
