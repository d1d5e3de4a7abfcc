"""Building a command's settings: CLI values over WIKIGPT_* env vars over a preset file
(configs/NAME.yaml) over the defaults declared in settings.py."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, describe_validation_error

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str, cls: type[BaseModel]) -> dict:
    """Settings from configs/NAME.yaml (or a .yaml path), checked against cls's fields."""
    import yaml

    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset {name}: unknown preset (known: {', '.join(preset_names()) or 'none'}; "
                          "or pass a path to a .yaml file)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--preset {name}: {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--preset {name}: {path} must be a mapping of setting: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        raise ConfigError(f"--preset {name}: unknown setting(s) {', '.join(unknown)} in {path}")
    return values


def build(cls: type[BaseModel], values: dict, preset: str | None = None) -> BaseModel:
    """Build settings from explicit values (CLI flags) over env vars, a preset and defaults.

    A preset value loses to a WIKIGPT_* env var for the same setting (pydantic-settings ranks
    constructor values above env vars, so those are dropped here). A validation failure
    becomes one ConfigError naming each bad setting as its CLI flag.
    """
    if preset:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        env = {k.upper() for k in os.environ}
        values = {**{k: v for k, v in load_preset(preset, cls).items() if f"{prefix}{k.upper()}" not in env}, **values}
    try:
        return cls(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
