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
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data as wdata
from .checkpoints import (
    CHECKPOINTS, OPTIMIZER_FILE, STATE_FILE, list_checkpoints, optimizer_from_safetensors, remove_partial_checkpoints,
    save_checkpoint, truncate_metrics,
)
from .errors import ConfigError
from .modeling import auto_dtype, context_length, resolve_device
from .decoding import SamplingParams
from .settings import PrepareSettings, TrainSettings

# ---------------------------------------------------------------- precision and devices
def device_type(name: str) -> str:
    """The kind of device --device names (settings checked the spelling). 'auto' is CUDA when
    visible, else the CPU; one process trains on one device, so GPUs are picked with
    CUDA_VISIBLE_DEVICES (torchrun/accelerate launch hand each process its own)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(name)  # an absent CUDA or MPS is a clear error here
    if device.index is not None:
        raise ConfigError(f"--device {name}: training takes cpu, cuda or mps (pick GPUs with CUDA_VISIBLE_DEVICES)")
    return device.type


def resolve_precision(name: str, device_type: str) -> str:
    if name == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(auto_dtype(device_type, "train"), "fp32")
    if name == "fp16" and device_type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on CPU use bf16 (with AMX) or fp32")
    return name


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


# ---------------------------------------------------------------- a run's set-up
def resume_point(out: Path, s: TrainSettings, accelerator) -> Path | None:
    """The checkpoint to resume from (--resume), after deleting what a killed run left
    half-written; without --resume, refuse or (--overwrite) clear a folder holding a run."""
    main = accelerator.is_main_process
    if main and out.is_dir():
        for path in remove_partial_checkpoints(out):
            print(f"wikigpt train: deleted {path}, left half-written by a killed run", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(out)
    if s.resume:
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
        return checkpoints[-1]
    if checkpoints or (out / "final").exists():
        if not s.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to start over")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            shutil.rmtree(out / "final", ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    return None


def load_data(s: TrainSettings, source, model, tokenizer, accelerator) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, validation or None) token streams, checked against the model."""
    ctx = context_length(model.config)
    if ctx and s.block_size > ctx:
        raise ConfigError(f"--block-size {s.block_size} is over the model's context length {ctx}")
    # Tokenize on the main process first (it fills the cache), then the others read the cache.
    with accelerator.main_process_first():
        train_tokens = wdata.load_split(source, "train", tokenizer, s.cache_dir, progress=accelerator.is_main_process)
        has_val = "validation" in source.splits
        val_tokens = wdata.load_split(source, "validation", tokenizer, s.cache_dir) if has_val else None
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
    if wdata.num_blocks(train_tokens, s.block_size) < 1:
        raise ConfigError(f"the training split has {len(train_tokens)} tokens, fewer than one block of {s.block_size}")
    return train_tokens, val_tokens


def build_optimizer(s: TrainSettings, model, plan: Plan, kind: str):
    """AdamW with nanoGPT's decay groups and a warm-up + cosine schedule to min_lr_ratio."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.learning_rate,
                                  betas=(s.adam_beta1, s.adam_beta2), fused=kind == "cuda")
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=plan.warmup,
                              num_training_steps=plan.max_steps, scheduler_specific_kwargs={"min_lr_rate": s.min_lr_ratio})
    return optimizer, scheduler


def restore(checkpoint: Path, optimizer, scheduler) -> Progress:
    """Optimizer, schedule and progress from a checkpoint (its weights were loaded with the model)."""
    from .modeling import load_tensors

    st = json.loads((checkpoint / STATE_FILE).read_text())
    optimizer.load_state_dict(optimizer_from_safetensors(load_tensors(checkpoint / OPTIMIZER_FILE), st["optimizer"]))
    scheduler.load_state_dict(st["scheduler"])
    return Progress(step=st["step"], samples_seen=st["samples_seen"], tokens_seen=st["tokens_seen"],
                    losses=st["losses"], evals=st["evals"], train_seconds=st["train_seconds"])


def _tracker(report_to: str) -> str | None:
    """accelerate's tracker name for --report-to, its package checked first: accelerate itself
    only warns and logs nowhere when the package is missing."""
    if report_to == "none":
        return None
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        hint = "pip install tensorboard" if report_to == "tensorboard" else "pip install wandb, then wandb login"
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package: {hint}")
    return report_to


# ---------------------------------------------------------------- the run
@dataclass
class Plan:
    """How many tokens make a step and how many steps make the run."""

    accum: int  # forward/backward passes per optimizer step
    tokens_per_step: int  # across all processes
    max_steps: int
    warmup: int

    @classmethod
    def of(cls, s: TrainSettings, n_train_tokens: int, world: int) -> Plan:
        per_pass = s.batch_size * s.block_size * world
        accum = max(1, round(s.tokens_per_step / per_pass))
        tokens_per_step = accum * per_pass
        max_steps = math.ceil(s.epochs * n_train_tokens / tokens_per_step) if s.epochs else s.max_steps
        return cls(accum, tokens_per_step, max_steps, min(s.warmup_steps, max_steps))


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint's trainer_state.json, restored on --resume."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0  # counted, not step x tokens_per_step: that may change on resume
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class Trainer:
    """A training run: what its loop touches, built once by `Trainer.setup`, and the loop's
    steps as methods (train_step, run_eval, checkpoint, loop, finish)."""

    s: TrainSettings
    out: Path
    accelerator: Any
    precision: str
    model: Any  # what trains (wrapped by DDP under several processes, maybe compiled)
    raw_model: Any  # what gets saved: unwrapped, uncompiled
    eval_model: Any  # unwrapped: DDP's forward may broadcast buffers, a collective that would
    # hang when ranks evaluate different numbers of batches
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    source: Any
    train_tokens: np.ndarray
    val_tokens: np.ndarray | None
    sampler: BlockSampler
    plan: Plan
    progress: Progress
    started: float = 0.0  # perf_counter at the start of this process's loop

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.main:
            print(f"wikigpt train: {message}", file=sys.stderr, flush=True)

    @classmethod
    def setup(cls, s: TrainSettings) -> Trainer:
        from accelerate import Accelerator

        if s.push_to_hub:  # a missing token fails now, not after the run
            from .push import hub_token

            hub_token()
        out = Path(s.output_dir).expanduser()
        kind = device_type(s.device)
        precision = resolve_precision(s.precision, kind)
        accelerator = Accelerator(cpu=kind == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision),
                                  log_with=_tracker(s.report_to), project_dir=str(out))
        resume_from = resume_point(out, s, accelerator)
        source = wdata.resolve_source(s)
        model, tokenizer = _load_start(s, resume_from)
        train_tokens, val_tokens = load_data(s, source, model, tokenizer, accelerator)
        plan = Plan.of(s, len(train_tokens), accelerator.num_processes)
        if s.compile:
            model = torch.compile(model)
        optimizer, scheduler = build_optimizer(s, model, plan, kind)
        model, optimizer = accelerator.prepare(model, optimizer)
        progress = restore(resume_from, optimizer, scheduler) if resume_from else Progress()
        if resume_from and accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", progress.step)
        trainer = cls(s=s, out=out, accelerator=accelerator, precision=precision, model=model,
                      raw_model=accelerator.unwrap_model(model, keep_torch_compile=False),
                      eval_model=accelerator.unwrap_model(model), tokenizer=tokenizer, optimizer=optimizer,
                      scheduler=scheduler, source=source, train_tokens=train_tokens, val_tokens=val_tokens,
                      sampler=BlockSampler(wdata.num_blocks(train_tokens, s.block_size), s.seed), plan=plan, progress=progress)
        if trainer.main:
            out.mkdir(parents=True, exist_ok=True)
        if s.report_to != "none":  # every process calls it; accelerate starts the tracker on the main one
            config = {k: v for k, v in s.model_dump(mode="json").items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("tensorboard" if s.report_to == "tensorboard" else "wikigpt", config=config,
                                      init_kwargs={"wandb": {"name": out.name}})
        return trainer

    def announce(self) -> None:
        s, plan, acc, n = self.s, self.plan, self.accelerator, self.sampler.n
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        world, step = acc.num_processes, self.progress.step
        self.log(f"{n_params / 1e6:.1f} M params, {self.precision} on {acc.device} x{world}; "
                 f"train {len(self.train_tokens):,} tokens ({n:,} blocks of {s.block_size}), "
                 f"{plan.tokens_per_step:,} tokens/step ({plan.accum} x {s.batch_size} x {s.block_size} x {world}), "
                 f"{plan.max_steps} steps" + (f", resuming at step {step}" if step else ""))

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over plan.accum passes; returns (mean loss across processes,
        gradient norm before clipping, seconds)."""
        s, acc, p, plan = self.s, self.accelerator, self.progress, self.plan
        world, rank = acc.num_processes, acc.process_index
        t0 = time.perf_counter()
        torch.manual_seed(hash((s.seed, p.step, rank)) % (2**63))  # dropout: a function of the step
        loss_sum = 0.0
        for micro in range(plan.accum):
            base = p.samples_seen + (micro * world + rank) * s.batch_size
            rows = wdata.get_blocks(self.train_tokens, [self.sampler.block(base + b) for b in range(s.batch_size)], s.block_size)
            rows_t = torch.from_numpy(rows).to(acc.device, non_blocking=True)
            sync = acc.no_sync(self.model) if micro < plan.accum - 1 else nullcontext()
            with sync, acc.autocast():
                loss = _loss(self.model, rows_t)
                acc.backward(loss / plan.accum)
            loss_sum += loss.item()
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), s.grad_clip)) if s.grad_clip > 0 else float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.samples_seen += plan.accum * world * s.batch_size
        p.tokens_seen += plan.tokens_per_step
        step_loss = float(acc.reduce(torch.tensor(loss_sum / plan.accum, device=acc.device), "mean"))
        dt = time.perf_counter() - t0
        p.train_seconds += dt
        p.losses.append(round(step_loss, 5))
        return step_loss, grad_norm, dt

    def run_eval(self, limit: int | None) -> dict | None:
        if self.val_tokens is None:
            return None
        s, step = self.s, self.progress.step
        loss = evaluate_loss(self.eval_model, self.val_tokens, s.block_size, s.batch_size, self.accelerator, limit)
        rec = {"step": step, "val_loss": round(loss, 5), "val_ppl": round(math.exp(min(loss, 50)), 3),
               "val_tokens": min(len(self.val_tokens) - 1, limit or len(self.val_tokens))}
        self.log(f"step {step}: validation loss {loss:.4f}, perplexity {rec['val_ppl']:,.2f}")
        # to the --report-to dashboard; accelerate's log does nothing without one
        self.accelerator.log({"val/loss": loss, "val/perplexity": math.exp(min(loss, 50))}, step=step)
        return rec

    def checkpoint(self, reason: str) -> None:
        p = self.progress
        state = {"step": p.step, "max_steps": self.plan.max_steps, "samples_seen": p.samples_seen, "losses": p.losses,
                 "evals": p.evals, "train_seconds": p.train_seconds, "stopped": reason, "tokens_seen": p.tokens_seen,
                 "settings": self.s.model_dump(mode="json")}
        self.accelerator.wait_for_everyone()
        if self.main:
            path = save_checkpoint(self.out, self.raw_model, self.tokenizer, self.optimizer, self.scheduler, state,
                                   self.s.keep_checkpoints)
            self.log(f"checkpoint {path}")
        self.accelerator.wait_for_everyone()

    def agreed_stop(self, wants: bool) -> str | None:
        """'interrupted', 'time limit' or None, the same on every process (or DDP would hang)."""
        acc, s = self.accelerator, self.s
        timed_out = bool(s.max_minutes and time.perf_counter() - self.started > s.max_minutes * 60)
        flags = torch.tensor([float(wants), float(timed_out)], device=acc.device)
        flags = acc.reduce(flags, "sum") if acc.num_processes > 1 else flags
        return "interrupted" if flags[0] > 0 else "time limit" if flags[1] > 0 else None

    def loop(self, should_stop: Callable[[int], bool] | None) -> tuple[str, int | None]:
        """Steps until max_steps, a signal, should_stop or the time limit; (reason, signal)."""
        s, p, max_steps = self.s, self.progress, self.plan.max_steps
        bar = self._progress_bar() if self.main and s.progress else None
        metrics = open(self.out / "metrics.jsonl", "a") if self.main else None
        reason = None
        self.started = time.perf_counter()
        with _StopFlag() as stop:
            while p.step < max_steps:
                loss, grad_norm, dt = self.train_step()
                self._log_step(bar, metrics, loss, grad_norm, dt)
                if s.eval_interval and p.step % s.eval_interval == 0 and p.step < max_steps:
                    rec = self.run_eval(s.eval_tokens)
                    if rec:
                        p.evals.append(rec)
                reason = self.agreed_stop(stop.signal is not None or bool(should_stop and should_stop(p.step)))
                if reason:
                    break
                if s.save_interval and p.step % s.save_interval == 0 and p.step < max_steps:
                    self.checkpoint("periodic")
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        return reason or "completed", stop.signal

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.plan.max_steps, initial=self.progress.step, unit="step", dynamic_ncols=True, desc="train",
                    mininterval=0.5 if sys.stderr.isatty() else 30)

    def _log_step(self, bar, metrics, loss: float, grad_norm: float, dt: float) -> None:
        lr, tok_s = self.scheduler.get_last_lr()[0], self.plan.tokens_per_step / dt
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
        if metrics is not None:
            metrics.write(json.dumps({"step": self.progress.step, "loss": round(loss, 5), "lr": lr,
                                      "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tok_s, 1),
                                      "time": round(self.progress.train_seconds, 3)}) + "\n")
            metrics.flush()
        self.accelerator.log({"train/loss": loss, "train/learning_rate": lr, "train/grad_norm": grad_norm,
                              "train/tokens_per_s": tok_s}, step=self.progress.step)

    def finish(self, reason: str) -> dict:
        """Final validation, the training report and the final model (output_dir/final)."""
        final_eval = self.run_eval(None)
        report = self.training_report(reason, final_eval)
        if self.main:
            from .modeling import save_model

            save_model(self.raw_model, self.tokenizer, self.out / "final", sampling=SamplingParams(),
                       extra_files={"training_report.json": report})
            ppl = f", validation perplexity {final_eval['val_ppl']:,.2f}" if final_eval else ""
            self.log(f"{reason}: {report['steps']} steps, {report['tokens_seen']:,} tokens in "
                     f"{report['train_seconds']:,.0f} s ({report['tokens_per_second']:,} tok/s){ppl}; "
                     f"model in {self.out / 'final'}")
            if self.s.push_to_hub:
                self.push_final()
        self.accelerator.wait_for_everyone()
        return report

    def push_final(self) -> None:
        """--push-to-hub: the final model and its card to the Hub; a failure keeps the saved model
        and says how to push it again."""
        from .errors import WikigptError
        from .push import push

        repo_id = self.s.hub_repo_id or self.out.resolve().name
        try:
            url = push(self.out, repo_id, private=self.s.hub_private)
        except WikigptError as exc:
            exc.message += (f" (the model is saved in {self.out / 'final'}; push it with "
                            f"`wikigpt push {self.out} --repo-id {repo_id}`)")
            raise
        self.log(f"pushed to the Hugging Face Hub: {url}")

    def training_report(self, reason: str, final_eval: dict | None) -> dict:
        p, plan, acc = self.progress, self.plan, self.accelerator
        history, n_train = p.losses, len(self.train_tokens)
        return {
                "stopped": reason, "steps": p.step, "max_steps": plan.max_steps, "tokens_seen": p.tokens_seen,
                "train_seconds": round(p.train_seconds, 2), "wall_seconds_this_run": round(time.perf_counter() - self.started, 2),
                "tokens_per_second": round(p.tokens_seen / p.train_seconds, 1) if p.train_seconds else None,
                "tokens_per_step": plan.tokens_per_step, "grad_accumulation": plan.accum, "processes": acc.num_processes,
                "device": str(acc.device), "precision": self.precision, "torch": torch.__version__,
                "n_params": sum(q.numel() for q in self.raw_model.parameters()),
                "train_loss_first": history[0] if history else None,
                "train_loss_last10": round(float(np.mean(history[-10:])), 4) if history else None,
                "losses": history if len(history) <= 500 else history[:: math.ceil(len(history) / 500)],
                "evals": p.evals, "validation": final_eval,
                "data": {"source": self.source.name, "train_tokens": n_train,
                         "validation_tokens": len(self.val_tokens) if self.val_tokens is not None else 0,
                         "epochs": round(p.tokens_seen / n_train, 3)},
            "settings": self.s.model_dump(mode="json"),
        }


# ---------------------------------------------------------------- entry points
def train(s: TrainSettings, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Run training; returns the training report (also written to output_dir/final).

    `should_stop(step)` is polled after every optimizer step (tests use it to interrupt a run
    at a known step, as a signal would).
    """
    trainer = Trainer.setup(s)
    trainer.announce()
    try:
        reason, signum = trainer.loop(should_stop)
        trainer.checkpoint(reason)
        if reason == "interrupted":
            trainer.log(f"stopped at step {trainer.progress.step}/{trainer.plan.max_steps}; continue with --resume")
            return {"stopped": reason, "step": trainer.progress.step, **({"signal": signum} if signum else {})}
        return trainer.finish(reason)
    finally:
        trainer.accelerator.end_training()  # flushes and closes the dashboards' writers


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
