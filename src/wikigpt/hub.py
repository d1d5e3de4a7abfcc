"""Which commit of a Hub model to read, and from which weights file; modeling.py loads it.

- `resolve_revision`: --revision, else the model's pinned commit (settings.PINNED_REVISIONS).
  The Hub's pages show 7-hex commit ids; huggingface_hub names cached snapshots by the full
  40-hex id, so a short one is looked up in the repository's history (online) or among the
  cached snapshots (offline).
- `weights_source`: safetensors wherever they exist for that commit. Many older repositories
  (the default model's among them) hold only a PyTorch pickle, `pytorch_model.bin`; the Hub's
  converter bot then often has an open pull request adding `model.safetensors`. That pull
  request's commit is used only if it sits directly on the requested commit, changes no file of
  it (every blob id equal; `.gitattributes` aside, never loaded) and adds nothing but safetensors
  files: the same model, without the pickle. Found online, it is remembered in the model's cache folder for offline starts.
  Without one, the pickle is read by torch's weights-only unpickler (modeling.load_model).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .files import write_atomic
from .settings import PINNED_REVISIONS

log = logging.getLogger("wikigpt.hub")

CONVERTER = "SFconvertbot"  # the Hub's safetensors converter, as transformers' auto-conversion checks
CONVERSION_TITLE = "Adding `safetensors` variant of this model"
SAFETENSORS = (".safetensors", ".safetensors.index.json")
_REMEMBERED = "wikigpt-safetensors-conversions.json"


def _cache_folder(name: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_revision(name: str, revision: str | None, not_found) -> str | None:
    """The revision to read `name` at (see the module's docstring); `not_found(name, reason)`
    makes the error to raise."""
    revision = revision or PINNED_REVISIONS.get(name)
    if revision is None or not re.fullmatch(r"[0-9a-f]{7,39}", revision):
        return revision  # a branch, a tag or a full commit id
    from huggingface_hub import HfApi

    commits = None
    if not _offline():
        try:
            commits = [c.commit_id for c in HfApi().list_repo_commits(name)]
        except Exception:  # the Hub unreachable: as offline
            commits = None
    if commits is None:  # what was downloaded before
        folder = _cache_folder(name) / "snapshots"
        commits = [p.name for p in folder.glob(f"{revision}*")] if folder.is_dir() else []
        commits += [c for c in _remembered(name) if c.startswith(revision) and c not in commits]
        if not commits:
            raise not_found(name, f"the Hugging Face Hub could not be reached and commit {revision} "
                                  "is not in the local cache")
    full = [c for c in commits if c.startswith(revision)]
    if len(full) != 1:
        raise not_found(name, f"commit {revision} is {'ambiguous' if full else 'not in its history'}")
    return full[0]


def weights_source(name: str, revision: str | None) -> tuple[str | None, bool]:
    """(revision to load, whether its weights are safetensors) for Hub model `name`."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if _offline():
        conversion = _remembered(name).get(revision or "")
        if conversion and (_cache_folder(name) / "snapshots" / conversion).is_dir():
            return conversion, True
        cached = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
                  if isinstance(try_to_load_from_cache(name, f, revision=revision), str)]
        return revision, _prefers_safetensors(cached)
    api = HfApi()
    files = _tree(api, name, revision)
    if _prefers_safetensors(files):
        return revision, True
    base = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else \
        api.list_repo_commits(name, revision=revision)[0].commit_id
    conversion = _conversion(api, name, base, files)
    if conversion is None:
        return revision, False
    log.info("%s: loading the safetensors conversion of commit %s (commit %s)", name, base[:7], conversion[:7])
    _remember(name, base, conversion)
    return conversion, True


def _prefers_safetensors(files) -> bool:
    """Safetensors where there are any, and where there is no pickle either (transformers' own
    error then says what is missing)."""
    return any(f.endswith(SAFETENSORS) for f in files) or not any(f.endswith(".bin") for f in files)


def _tree(api, name: str, revision: str | None) -> dict[str, str]:
    """path -> blob id of every file at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f.blob_id for f in api.list_repo_tree(name, revision=revision, recursive=True)
            if isinstance(f, RepoFile)}


def _conversion(api, name: str, base: str, files: dict[str, str]) -> str | None:
    """The commit of the converter bot's open pull request on `base`, if it only adds safetensors."""
    for pr in api.get_repo_discussions(name, discussion_type="pull_request", discussion_status="open"):
        if pr.title != CONVERSION_TITLE or pr.author != CONVERTER:
            continue
        commits = [c.commit_id for c in api.list_repo_commits(name, revision=pr.git_reference)]
        if len(commits) < 2 or commits[1] != base:
            continue
        theirs = _tree(api, name, commits[0])
        added = set(theirs) - set(files)
        # .gitattributes (which files git stores in LFS) may gain a line; it is never loaded
        same = all(theirs.get(p) == b for p, b in files.items() if p != ".gitattributes")
        if added and all(p.endswith(SAFETENSORS) for p in added) and same:
            return commits[0]
    return None


def _remembered(name: str) -> dict[str, str]:
    try:
        data = json.loads((_cache_folder(name) / _REMEMBERED).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _remember(name: str, base: str, conversion: str) -> None:
    folder = _cache_folder(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = {**_remembered(name), base: conversion}
        write_atomic(folder / _REMEMBERED, json.dumps(data))
    except OSError as exc:  # a read-only cache: offline starts then use the pickle if cached
        log.warning("could not note the safetensors conversion in %s: %s", folder, exc)
