"""`wikigpt train`: fine-tune (or train from scratch) a causal LM on packed blocks of one token
stream, resumably, on one CPU, one GPU or many processes.

Why a plain `accelerate` loop rather than transformers' `Trainer`: the run has to resume
*exactly* (same weights as an uninterrupted run), stop cleanly on SIGINT/SIGTERM at a step
boundary with a checkpoint, keep the optimizer state in safetensors (Trainer pickles it with
torch.save), and sample blocks from a memmap by a rule we control. A ~nanoGPT-sized loop does
all of that in plain sight; accelerate supplies what is worth not rewriting: process-group
setup under torchrun/`accelerate launch` (NCCL on GPUs, gloo on CPUs), DDP wrapping with
no_sync for accumulation, mixed precision with fp32 master weights (and the fp16 loss scaler).

Exact resume without saving RNG streams: block order is a seeded permutation per epoch indexed
by the count of blocks consumed, and dropout is re-seeded from (seed, step, rank) at every
step, so a run's state is fully determined by its step, weights, optimizer and schedule.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data as wdata
from .errors import ConfigError
from .modeling import cpu_bf16_speedup
from .settings import PrepareSettings, SamplingParams, TrainSettings

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------- precision and devices
def resolve_precision(name: str, device_type: str) -> str:
    if name == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # bf16 autocast pays where bf16 matmuls are clearly faster (AMX: ~6x, training step
        # ~1.5x); where bf16 is emulated it would be a 30x slowdown.
        return "bf16" if device_type == "cpu" and cpu_bf16_speedup() > 1.5 else "fp32"
    if name == "fp16" and device_type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on CPU use bf16 (with AMX) or fp32")
    return name


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


# ---------------------------------------------------------------- checkpoints
# A checkpoint folder appears only complete: save_model writes into a hidden temporary sibling
# and renames it into place, and an old one is renamed to a hidden name before it is deleted.
# So a process killed at any moment leaves step-* folders that are whole plus, at worst, hidden
# leftovers, which the next start deletes.
def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first."""
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if _complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (STATE_FILE, OPTIMIZER_FILE, "model.safetensors"))


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------- model and data set-up
def _load_start(s: TrainSettings, resume_from: Path | None):
    """(model in fp32 train mode, tokenizer) from a checkpoint, pretrained weights or scratch."""
    from .modeling import init_model, load_model, load_tokenizer
    from .settings import ModelSettings

    if resume_from is not None:
        lm = load_model(ModelSettings(model=str(resume_from), device="cpu", dtype="float32"))
        return lm.model.train(), lm.tokenizer
    if s.init == "pretrained":
        if s.tokenizer or s.new_vocab_size:
            raise ConfigError("--tokenizer/--new-vocab-size need --init scratch (a pretrained model keeps its own)")
        lm = load_model(ModelSettings(model=s.model, revision=s.revision, device="cpu", dtype="float32"))
        return lm.model.train(), lm.tokenizer
    if s.new_vocab_size:
        tokenizer = train_tokenizer(s)
    else:
        tokenizer = load_tokenizer(s.tokenizer or s.model, s.revision if not s.tokenizer else None)
    torch.manual_seed(s.seed)
    model = init_model(s.architecture or s.model, tokenizer, s.config_overrides)
    return model.train(), tokenizer


def train_tokenizer(s: TrainSettings):
    """A byte-level BPE (GPT-2's scheme) with --new-vocab-size tokens, learned on the training split."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = wdata.read_text(wdata.resolve_source(s), "train")
    bpe = ByteLevelBPETokenizer()
    eos = "<|endoftext|>"
    bpe.train_from_iterator(wdata.split_articles(text), vocab_size=s.new_vocab_size, min_frequency=2,
                            special_tokens=[eos], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos,
                                  pad_token=eos, model_max_length=1024)
    tok.name_or_path = f"bpe-{s.new_vocab_size}"
    return tok


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 0) or 0)


class BlockSampler:
    """Which blocks each process trains on: epoch e visits all blocks in the order of a
    permutation seeded by (seed, e); global sample k is block perm_e[k mod n], e = k // n."""

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n, self.seed, self._epoch, self._perm = n_blocks, seed, -1, None

    def block(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return int(self._perm[k % self.n])


def _loss(model, rows: torch.Tensor) -> torch.Tensor:
    # Every position predicts the next token (block_size targets per block_size inputs); the
    # cross-entropy is taken in fp32 even under autocast, as HF's own loss does.
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate_loss(model, tokens: np.ndarray, block_size: int, batch_size: int, accelerator,
                  max_tokens: int | None = None) -> float:
    """Mean next-token loss over non-overlapping blocks of the stream (shared across processes)."""
    n = wdata.num_blocks(tokens, block_size)
    if max_tokens:
        n = min(n, max(1, max_tokens // block_size))
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        rows = torch.from_numpy(wdata.get_blocks(tokens, mine[i : i + batch_size], block_size)).to(accelerator.device)
        with accelerator.autocast():
            loss = _loss(model, rows)
        n_targets = rows[:, 1:].numel()
        total += torch.tensor([loss.item() * n_targets, n_targets], dtype=torch.float64, device=accelerator.device)
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _param_groups(model, weight_decay: float) -> list[dict]:
    # nanoGPT's rule: decay matrices (dim >= 2), not biases or LayerNorm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second signal kills at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
        print(f"\nwikigpt: {signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send it again to quit without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the loop
def train(s: TrainSettings, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Run training; returns the training report (also written to output_dir/final).

    `should_stop(step)` is polled after every optimizer step (tests use it to interrupt a run
    at a known step, as a signal would).
    """
    from accelerate import Accelerator

    out = Path(s.output_dir).expanduser()
    if s.device not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"--device {s.device}: use auto, cpu, cuda or mps (pick GPUs with CUDA_VISIBLE_DEVICES)")
    want_cpu = s.device == "cpu" or (s.device == "auto" and not torch.cuda.is_available())
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__}")
    device_type = "cpu" if want_cpu else ("cuda" if torch.cuda.is_available() else "mps")
    precision = resolve_precision(s.precision, device_type)
    accelerator = Accelerator(cpu=want_cpu, mixed_precision={"fp32": "no"}.get(precision, precision))
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    if main and out.is_dir():
        for path in remove_partial_checkpoints(out):
            print(f"wikigpt train: deleted {path}, left half-written by a killed run", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(out)
    resume_from = None
    if s.resume:
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
        resume_from = checkpoints[-1]
    elif checkpoints or (out / "final").exists():
        if not s.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to start over")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            shutil.rmtree(out / "final", ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()

    source = wdata.resolve_source(s)
    model, tokenizer = _load_start(s, resume_from)
    ctx = context_length(model)
    if ctx and s.block_size > ctx:
        raise ConfigError(f"--block-size {s.block_size} is over the model's context length {ctx}")
    # Tokenize on the main process first (it fills the cache), then the others read the cache.
    with accelerator.main_process_first():
        train_tokens, train_meta = wdata.load_split_with_meta(source, "train", tokenizer, s.cache_dir, progress=main)
        has_val = "validation" in source.splits
        val_tokens = wdata.load_split(source, "validation", tokenizer, s.cache_dir) if has_val else None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.get_input_embeddings().num_embeddings}")
    n_blocks = wdata.num_blocks(train_tokens, s.block_size)
    if n_blocks < 1:
        raise ConfigError(f"the training split has {len(train_tokens)} tokens, fewer than one block of {s.block_size}")

    per_pass = s.batch_size * s.block_size * world
    accum = max(1, round(s.tokens_per_step / per_pass))
    tokens_per_step = accum * per_pass
    max_steps = math.ceil(s.epochs * len(train_tokens) / tokens_per_step) if s.epochs else s.max_steps
    warmup = min(s.warmup_steps, max_steps)

    from transformers import get_scheduler

    if s.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.learning_rate,
                                  betas=(s.adam_beta1, s.adam_beta2), fused=device_type == "cuda")
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                              scheduler_specific_kwargs={"min_lr_rate": s.min_lr_ratio})
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # what gets saved
    # Evaluation runs on the model without its DDP wrapper: DDP's forward may broadcast buffers,
    # a collective that would hang when ranks evaluate different numbers of batches.
    eval_model = accelerator.unwrap_model(model)

    step, samples_seen, tokens_seen, history, evals, elapsed_before = 0, 0, 0, [], [], 0.0
    if resume_from is not None:
        from .modeling import load_tensors

        st = json.loads((resume_from / STATE_FILE).read_text())
        optimizer.load_state_dict(optimizer_from_safetensors(load_tensors(resume_from / OPTIMIZER_FILE), st["optimizer"]))
        scheduler.load_state_dict(st["scheduler"])
        step, samples_seen, history, evals = st["step"], st["samples_seen"], st["losses"], st["evals"]
        tokens_seen = st["tokens_seen"]  # counted, not step x tokens_per_step: that may change on resume
        elapsed_before = st["train_seconds"]
        if main:
            truncate_metrics(out / "metrics.jsonl", step)

    sampler = BlockSampler(n_blocks, s.seed)
    if main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"wikigpt train: {n_params / 1e6:.1f} M params, {precision} on {accelerator.device} x{world}; "
              f"train {len(train_tokens):,} tokens ({n_blocks:,} blocks of {s.block_size}), "
              f"{tokens_per_step:,} tokens/step ({accum} x {s.batch_size} x {s.block_size} x {world}), "
              f"{max_steps} steps" + (f", resuming at step {step}" if step else ""), file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)

    def state(reason: str) -> dict:
        return {"step": step, "max_steps": max_steps, "samples_seen": samples_seen, "losses": history,
                "evals": evals, "train_seconds": train_seconds, "stopped": reason,
                "tokens_seen": tokens_seen, "settings": s.model_dump(mode="json")}

    def checkpoint(reason: str) -> None:
        accelerator.wait_for_everyone()
        if main:
            path = save_checkpoint(out, raw_model, tokenizer, optimizer, scheduler, state(reason), s.keep_checkpoints)
            print(f"wikigpt train: checkpoint {path}", file=sys.stderr, flush=True)
        accelerator.wait_for_everyone()

    def run_eval(limit: int | None) -> dict | None:
        if val_tokens is None:
            return None
        loss = evaluate_loss(eval_model, val_tokens, s.block_size, s.batch_size, accelerator, limit)
        rec = {"step": step, "val_loss": round(loss, 5), "val_ppl": round(math.exp(min(loss, 50)), 3),
               "val_tokens": min(len(val_tokens) - 1, limit or len(val_tokens))}
        if main:
            print(f"wikigpt train: step {step}: validation loss {loss:.4f}, perplexity {rec['val_ppl']:,.2f}",
                  file=sys.stderr, flush=True)
        return rec

    bar = None
    if main and s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
                   mininterval=0.5 if sys.stderr.isatty() else 30)
    metrics = open(out / "metrics.jsonl", "a") if main else None
    train_seconds, reason = elapsed_before, "completed"
    run_start = time.perf_counter()
    with _StopFlag() as stop:
        while step < max_steps:
            t0 = time.perf_counter()
            torch.manual_seed(hash((s.seed, step, rank)) % (2**63))
            loss_sum = 0.0
            for micro in range(accum):
                base = samples_seen + (micro * world + rank) * s.batch_size
                rows = wdata.get_blocks(train_tokens, [sampler.block(base + b) for b in range(s.batch_size)], s.block_size)
                rows_t = torch.from_numpy(rows).to(accelerator.device, non_blocking=True)
                sync = accelerator.no_sync(model) if micro < accum - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss = _loss(model, rows_t)
                    accelerator.backward(loss / accum)
                loss_sum += loss.item()
            if s.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), s.grad_clip))
            else:
                grad_norm = float("nan")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += accum * world * s.batch_size
            tokens_seen += tokens_per_step
            step_loss = float(accelerator.reduce(torch.tensor(loss_sum / accum, device=accelerator.device), "mean"))
            dt = time.perf_counter() - t0
            train_seconds += dt
            history.append(round(step_loss, 5))
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                bar.update(1)
            if metrics is not None:
                metrics.write(json.dumps({"step": step, "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                                          "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens_per_step / dt, 1),
                                          "time": round(train_seconds, 3)}) + "\n")
                metrics.flush()
            if s.eval_interval and step % s.eval_interval == 0 and step < max_steps:
                rec = run_eval(s.eval_tokens)
                if rec:
                    evals.append(rec)
            # Every process must agree to stop at the same step, or DDP would hang.
            wants = stop.signal is not None or bool(should_stop and should_stop(step))
            timed_out = bool(s.max_minutes and time.perf_counter() - run_start > s.max_minutes * 60)
            flags = torch.tensor([float(wants), float(timed_out)], device=accelerator.device)
            flags = accelerator.reduce(flags, "sum") if world > 1 else flags
            if flags[0] > 0:
                reason = "interrupted"
                break
            if flags[1] > 0:
                reason = "time limit"
                break
            if s.save_interval and step % s.save_interval == 0 and step < max_steps:
                checkpoint("periodic")
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    checkpoint(reason)
    if reason == "interrupted":
        if main:
            print(f"wikigpt train: stopped at step {step}/{max_steps}; continue with --resume", file=sys.stderr)
        return {"stopped": reason, "step": step, **({"signal": stop.signal} if stop.signal else {})}

    final_eval = run_eval(None)
    report = {
        "stopped": reason, "steps": step, "max_steps": max_steps, "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 2), "wall_seconds_this_run": round(time.perf_counter() - run_start, 2),
        "tokens_per_second": round(tokens_seen / train_seconds, 1) if train_seconds else None,
        "tokens_per_step": tokens_per_step, "grad_accumulation": accum, "processes": world,
        "device": str(accelerator.device), "precision": precision, "torch": torch.__version__,
        "n_params": sum(p.numel() for p in raw_model.parameters()),
        "train_loss_first": history[0] if history else None,
        "train_loss_last10": round(float(np.mean(history[-10:])), 4) if history else None,
        "losses": history if len(history) <= 500 else history[:: math.ceil(len(history) / 500)],
        "evals": evals, "validation": final_eval,
        "data": {"source": source.name, "train_tokens": len(train_tokens),
                 "validation_tokens": len(val_tokens) if val_tokens is not None else 0,
                 "epochs": round(tokens_seen / len(train_tokens), 3)},
        "settings": s.model_dump(mode="json"),
    }
    if main:
        from .modeling import save_model

        save_model(raw_model, tokenizer, out / "final", sampling=SamplingParams(),
                   extra_files={"training_report.json": report})
        ppl = f", validation perplexity {final_eval['val_ppl']:,.2f}" if final_eval else ""
        print(f"wikigpt train: {reason}: {step} steps, {tokens_seen:,} tokens in {train_seconds:,.0f} s "
              f"({report['tokens_per_second']:,} tok/s){ppl}; model in {out / 'final'}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return report


def run(s: TrainSettings) -> int:
    report = train(s)
    if report.get("stopped") == "interrupted":
        return 128 + report.get("signal", signal.SIGINT)  # the shell's convention: 130 SIGINT, 143 SIGTERM
    return 0


def run_prepare(s: PrepareSettings) -> int:
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(s.tokenizer or s.model)
    metas = wdata.prepare(s, tokenizer, progress=True)
    print(f"{'split':<11} {'tokens':>12} {'articles':>9} {'cache':<7} file")
    for split, m in metas.items():
        path = Path(s.cache_dir).expanduser() / f"{split}-{m['key']}.bin"
        print(f"{split:<11} {m['n_tokens']:>12,} {m['n_documents']:>9,} {'reused' if m['cached'] else 'built':<7} {path}")
    return 0
