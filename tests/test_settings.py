"""settings.py and presets.py: the one validation-error formatter (errors.py), shared fields, the cache
dir's default."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from fastapi.exceptions import RequestValidationError

from wikigpt.api.protocol import invalid
from wikigpt.decoding import SamplingParams
from wikigpt.errors import ConfigError, describe_validation_error
from wikigpt.presets import build
from wikigpt.settings import BASE_MODEL, DEFAULT_MODEL, EvalSettings, ModelSettings, TrainSettings


def errors_of(cls: type[BaseModel], **values) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        cls(**values)
    return info.value


def test_cli_form_names_each_bad_setting_as_its_flag():
    exc = errors_of(SamplingParams, max_new_tokens=0, top_k=-1)
    assert describe_validation_error(exc) == ("invalid settings: --max-new-tokens: Input should be greater than or "
                                              "equal to 1; --top-k: Input should be greater than or equal to 0")
    with pytest.raises(ConfigError, match="^invalid settings: --learning-rate: Input should be greater than 0$"):
        build(TrainSettings, {"learning_rate": 0})


def test_api_form_names_body_fields_and_drops_fastapis_prefix():
    errors = [{"loc": ("body", "prompt", 0), "msg": "Input should be a valid string", "type": "string_type"},
              {"loc": ("body", "suffix"), "msg": "Extra inputs are not permitted", "type": "extra_forbidden"},
              {"loc": ("body",), "msg": "Input should be an object", "type": "model_type"}]
    err = invalid(RequestValidationError(errors))
    assert err.message == ("invalid request: prompt.0: Input should be a valid string; suffix: unknown field; "
                           "Input should be an object")
    assert err.param == "prompt.0" and err.http_status == 400
    assert describe_validation_error(errors, as_flags=False, limit=1).count(";") == 0


def test_model_fields_are_declared_once_and_validated_everywhere():
    for cls in (ModelSettings, TrainSettings, EvalSettings):
        with pytest.raises(ValidationError, match="must be one of auto, cpu, cuda, cuda:N, mps"):
            cls(device="tpu")
    assert TrainSettings.model_fields["revision"].description == ModelSettings.model_fields["revision"].description
    # Serving defaults to the fine-tuned model; training fine-tunes the base one.
    assert ModelSettings().model == DEFAULT_MODEL != TrainSettings().model == BASE_MODEL
    assert EvalSettings.model_fields["cache_dir"].description == TrainSettings.model_fields["cache_dir"].description


def test_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("WIKIGPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert TrainSettings().cache_dir == EvalSettings().cache_dir == str(tmp_path / "wikigpt" / "data")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert TrainSettings().cache_dir.endswith("/.cache/wikigpt/data") and "~" not in TrainSettings().cache_dir
