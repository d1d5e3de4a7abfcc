"""OpenAI's chat completions for a base model: messages in, a prompt out; outputs back in the
`chat.completion` shape.

A base model (DistilGPT2) has no chat template. vLLM then refuses chat; llama.cpp applies a
default one. Here the model's own template is used where its tokenizer has one, otherwise a
plain transcript that a model trained on web text continues naturally:

    {system message}            (if any, then a blank line)
    User: {message}
    Assistant: {message}
    ...
    Assistant:

The model's continuation is the assistant's next message; it stops at "\nUser:" (the model
starting the user's next turn) besides the request's own stop strings. The rendering happens
here in both serving modes: the gateway sends the transcript to its upstream as a completion,
so a base model behind vLLM (which has no template to apply) can still be chatted with.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError

ROLES = {"system": None, "developer": None, "user": "User", "assistant": "Assistant"}
TRANSCRIPT_STOP = "\nUser:"


def message_text(content: str | list[dict], index: int) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{index}].content: only text parts are supported "
                                      f"(this model reads text only), got type {part.get('type')!r}",
                                      param=f"messages[{index}].content")
        texts.append(part["text"])
    return "".join(texts)


def render(messages: list[dict], tokenizer: Any | None) -> tuple[str, list[str]]:
    """The prompt for `messages` and the stop strings the template needs."""
    texts = [(m["role"], message_text(m["content"], i)) for i, m in enumerate(messages)]
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        prompt = tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in texts], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, []
    lines = []
    for role, text in texts:
        if ROLES[role] is None:
            lines.append(text.strip() + "\n")
        else:
            lines.append(f"{ROLES[role]}: {text.strip()}")
    return "\n".join(lines) + "\nAssistant:", [TRANSCRIPT_STOP]


def chat_logprobs(scores: list[Any], top_n: int) -> dict:
    """OpenAI's chat `logprobs` object: each generated token with its bytes and its `top_n` most
    likely alternatives (an upstream's legacy object may list the chosen token as one more)."""
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.text, s.logprob),
                         "top_logprobs": [entry(t, v) for t, v in sorted(s.top, key=lambda tv: -tv[1])[:top_n]]}
                        for s in scores]}


class AssistantText:
    """The assistant's message as it streams: the transcript leaves a space (and the model may
    leave newlines) before it, which a chat client would show; they are dropped until the
    first visible character."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text
