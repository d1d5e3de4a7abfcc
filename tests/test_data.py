"""data.py: sources, article splitting, the token cache and block packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wikigpt import data
from wikigpt.data import DataError
from wikigpt.settings import DataSettings

WIKI = (
    " \n = Alpha = \n \n Alpha is a letter .\n \n = = History = = \n \n It came first .\n"
    " \n = Beta = \n \n Beta is the second letter .\n"
    " \n = Gamma = \n \n Gamma follows .\n"
)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_split_articles_keeps_sections_inside_and_text_exact():
    arts = data.split_articles(WIKI)
    assert len(arts) == 3
    assert arts[0].startswith(" \n = Alpha = ") and " = = History = = " in arts[0]
    assert arts[1].startswith(" = Beta = ")
    assert "".join(arts) == WIKI
    assert data.split_articles("no titles here\nat all\n") == ["no titles here\nat all\n"]


def test_eos_follows_each_article(tokenizer):
    arts = data.split_articles(WIKI)
    stream = np.concatenate(list(data.tokenize_documents(arts, tokenizer)))
    eos = tokenizer.eos_token_id
    assert stream.dtype == np.uint16
    assert int((stream == eos).sum()) == 3 and stream[-1] == eos
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    assert [tokenizer.decode(p[:-1]) for p in pieces] == arts


def test_prepare_caches_and_second_run_reuses(tmp_path, tokenizer):
    train = tmp_path / "train.txt"
    train.write_text(WIKI * 20)
    s = DataSettings(train_file=str(train), validation_split_percent=10, cache_dir=str(tmp_path / "cache"))
    first = data.prepare(s, tokenizer, progress=False)
    assert set(first) == {"train", "validation"} and not first["train"]["cached"]
    assert first["train"]["n_documents"] == 54 and first["validation"]["n_documents"] == 6
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and all(f.endswith((".bin", ".json")) for f in files)
    second = data.prepare(s, tokenizer, progress=False)
    assert second["train"]["cached"] and second["train"]["n_tokens"] == first["train"]["n_tokens"]
    stream = data.load_split(s, "train", tokenizer)
    assert isinstance(stream, np.memmap) and len(stream) == first["train"]["n_tokens"]
    # Changing the text changes the key: a new entry, never a stale cache.
    train.write_text(WIKI * 21)
    third = data.prepare(s, tokenizer, progress=False)
    assert not third["train"]["cached"] and third["train"]["key"] != first["train"]["key"]
    meta = json.loads((tmp_path / "cache" / f"train-{first['train']['key']}.json").read_text())
    assert meta["n_tokens"] == first["train"]["n_tokens"]


def test_folder_without_train_split_names_what_it_found(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(WIKI)
    (tmp_path / "wiki.test.raw").write_text(WIKI)
    with pytest.raises(DataError) as err:
        data.resolve_source(DataSettings(data=str(tmp_path)))
    msg = err.value.message
    assert "wiki.train.raw" in msg and "found: wiki.test.raw, wiki.valid.raw" in msg and "--train-file" in msg


def test_folder_source_and_missing_splits(tmp_path, tokenizer):
    (tmp_path / "wiki.train.raw").write_text(WIKI * 4)
    (tmp_path / "wiki.valid.raw").write_text(WIKI)
    src = data.resolve_source(DataSettings(data=str(tmp_path)))
    assert src.kind == "folder" and src.splits == ("train", "validation")
    assert data.read_text(src, "validation") == WIKI
    with pytest.raises(DataError, match="no test split"):
        data.load_split(src, "test", tokenizer, tmp_path / "c")
    only_train = data.resolve_source(DataSettings(train_file=str(tmp_path / "wiki.train.raw"),
                                                  validation_split_percent=0))
    with pytest.raises(DataError, match="validation-split-percent"):
        data.read_text(only_train, "validation")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": None}, "no data"),
        ({"data": "/nonexistent/folder"}, "no such folder"),
        ({"train_file": "/nonexistent.txt"}, "no such file"),
        ({"data": "wikitext-2-raw-v1", "train_file": __file__}, "pass one of them"),
    ],
)
def test_bad_sources_are_clear_config_errors(kwargs, match):
    with pytest.raises(DataError, match=match) as err:
        data.resolve_source(DataSettings(**kwargs))
    assert err.value.exit_code == 2


def test_hub_source_offline_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="could not load the Hub dataset .*--train-file"):
        data.load_split("wikitext-2-raw-v1", "train", tokenizer, tmp_path)


def test_blocks_cover_the_stream_without_padding():
    stream = np.arange(1, 22, dtype=np.uint16)  # 21 tokens
    assert data.num_blocks(stream, 5) == 4
    rows = data.get_blocks(stream, [0, 3], 5)
    assert rows.shape == (2, 6) and rows.dtype == np.int64
    assert rows[0].tolist() == [1, 2, 3, 4, 5, 6] and rows[1].tolist() == [16, 17, 18, 19, 20, 21]


def test_real_wikitext_offline_path(wikitext_dir, shared_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_tokenizer_dir)
    s = DataSettings(train_file=str(wikitext_dir / "wiki.valid.raw"), test_file=str(wikitext_dir / "wiki.test.raw"),
                     validation_split_percent=5, cache_dir=str(tmp_path))
    meta = data.prepare(s, tok, progress=False)
    assert set(meta) == {"train", "validation", "test"}
    # 60 WikiText-2 validation articles: 57 train + 3 held out; ~250 k GPT-2 tokens in all.
    assert meta["train"]["n_documents"] + meta["validation"]["n_documents"] == 60
    assert meta["validation"]["n_documents"] == 3
    assert 200_000 < meta["train"]["n_tokens"] + meta["validation"]["n_tokens"] < 300_000
