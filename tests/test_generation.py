import threading

from wikigpt.generation import generate, stream
from wikigpt.decoding import SamplingParams
from wikigpt.textfilter import clean_continuation


def test_same_seed_same_text(tiny_lm):
    p = SamplingParams(max_new_tokens=24, seed=123)
    a, b = generate(tiny_lm, "Data science is", p), generate(tiny_lm, "Data science is", p)
    assert a == b and a.startswith("Data science is") and len(a) > len("Data science is")
    others = {generate(tiny_lm, "Data science is", p.model_copy(update={"seed": s})) for s in range(1, 6)}
    assert len(others | {a}) > 1  # sampling does depend on the seed


def test_min_p_reaches_generate(tiny_lm):
    """min_p 1 keeps only the most likely token, so hot sampling is greedy; greedy configs carry no
    sampling knob (transformers rejects them there)."""
    greedy = generate(tiny_lm, "The history of", SamplingParams(max_new_tokens=10, temperature=0.0))
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)
    assert generate(tiny_lm, "The history of", hot.model_copy(update={"min_p": 1.0})) == greedy
    assert generate(tiny_lm, "The history of", hot) != greedy
    config = SamplingParams(temperature=0.0, min_p=0.2).generation_config(tiny_lm.tokenizer)
    assert not config.do_sample and config.min_p is None and config.repetition_penalty == 1.1


def test_temperature_zero_is_greedy(tiny_lm):
    """Greedy ignores the seed and equals argmax decoding done by hand."""
    import torch

    p = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.0)
    texts = {generate(tiny_lm, "The history of", p.model_copy(update={"seed": s})) for s in (1, 2, 3)}
    assert len(texts) == 1
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    ids = tok("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    by_hand = tok.decode(ids[0], skip_special_tokens=True)
    prompt_len = len("The history of")
    assert texts.pop() == "The history of" + clean_continuation(by_hand[prompt_len:])


def test_stop_strings_stop(tiny_lm):
    p = SamplingParams(max_new_tokens=30, temperature=0.0)
    full = generate(tiny_lm, "Data science is", p)
    cont = full[len("Data science is"):]
    stop = cont.strip()[len(cont.strip()) // 2:][:3]  # a piece from the middle of the output
    assert stop.strip(), cont
    cut = generate(tiny_lm, "Data science is", p.model_copy(update={"stop": [stop]}))
    assert stop not in cut[len("Data science is"):]
    assert full.startswith(cut.rstrip())
    assert len(cut) < len(full)


def test_generate_streams_in_pieces(tiny_lm):
    p = SamplingParams(max_new_tokens=40, seed=7, repetition_penalty=1.0)
    pieces = list(stream(tiny_lm, "Wikipedia is", p))
    assert len(pieces) > 3
    assert "Wikipedia is" + "".join(pieces) == generate(tiny_lm, "Wikipedia is", p)


def test_closing_the_stream_early_stops_generation(tiny_lm):
    # seed 1 runs the full 240 tokens (no EOS) when not stopped; 240 fits the tiny model's 256 positions
    forwards: list[int] = []
    hook = tiny_lm.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        it = stream(tiny_lm, "Wikipedia is", SamplingParams(max_new_tokens=240, seed=1))
        next(it)
        it.close()  # sets the stop event and joins the worker
    finally:
        hook.remove()
    assert not any(t.name == "wikigpt-generate" for t in threading.enumerate())
    assert len(forwards) < 240
