"""A training run's checkpoints: RUN_DIR/checkpoints/step-NNNNNNN/, each a loadable model plus
the optimizer state (safetensors: resuming never unpickles anything) and trainer_state.json.

A checkpoint folder appears only complete: modeling.save_model writes into a hidden temporary
sibling and renames it into place, and an old one is renamed to a hidden name before it is
deleted. So a process killed at any moment leaves step-* folders that are whole plus, at
worst, hidden leftovers, which the next start deletes (remove_partial_checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .files import write_atomic

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------- optimizer state <-> safetensors
def optimizer_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON scalars."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- checkpoint folders
def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first."""
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if _complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (STATE_FILE, OPTIMIZER_FILE, WEIGHTS_FILE))


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete what a killed run left half-written: hidden temporaries of checkpoints and of
    final/, and step-* folders that are not complete. Returns what was deleted."""
    root = output_dir / CHECKPOINTS
    leftovers = [*output_dir.glob(".final.*"), *output_dir.glob(".metrics.jsonl.*")]
    if root.is_dir():
        leftovers += [p for p in root.iterdir() if p.name.startswith(".") or not _complete(p)]
    for path in leftovers:
        _delete(path)
    return leftovers


def _delete(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden folder, not a step-* one."""
    trash = path.with_name(f".{path.name.lstrip('.')}.trash-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def save_checkpoint(output_dir: Path, model, tokenizer, optimizer, scheduler, state: dict, keep: int) -> Path:
    from .modeling import save_model

    tensors, opt_meta = optimizer_to_safetensors(optimizer.state_dict())
    payload = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
    path = save_model(model, tokenizer, output_dir / CHECKPOINTS / f"step-{state['step']:07d}",
                      extra_files={STATE_FILE: payload}, extra_tensors={OPTIMIZER_FILE: tensors})
    for old in list_checkpoints(output_dir)[:-keep]:
        _delete(old)
    return path


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's records up to `step` (the resumed checkpoint's): the steps after it
    are trained again, and a line cut short by a kill would otherwise be glued to the next."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_atomic(path, "".join(kept))
