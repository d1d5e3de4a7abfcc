"""`wikigpt report RUN_DIR`: what a person wants to see after a training run, in one Markdown file.

RUN_DIR/report.md holds: the run's numbers (from final/training_report.json), a PNG of training
and validation loss against tokens seen (every step from RUN_DIR/metrics.jsonl when present,
else the report's subsampled losses), the perplexity table that `wikigpt evaluate` recorded in
the model's eval_report.json (the base model's row appears when both were evaluated in one
command), sample continuations of fixed prompts with the default decoding, and the
greedy-vs-default decoding-quality table.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from .checkpoints import STATE_FILE, list_checkpoints
from .errors import ConfigError
from .evalreport import read_eval_report, result_key
from .evaluate import fmt_ppl
from .files import write_atomic
from .settings import ReportSettings

TRAINING_REPORT = "training_report.json"


def find_model_dir(run_dir: Path, model: str | None) -> Path:
    """--model, else RUN_DIR/final, else RUN_DIR itself, else the newest checkpoint of a run that
    is still going or was interrupted (its report says so)."""
    if model:
        return Path(model).expanduser()
    for candidate in (run_dir / "final", run_dir, *reversed(list_checkpoints(run_dir))):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{run_dir} holds no model (no final/config.json and no checkpoint): pass the model "
                      "with --model")


def read_training_report(run_dir: Path, model_dir: Path) -> dict | None:
    """final/training_report.json, or for a checkpoint the trainer state it was saved with."""
    for path in (model_dir / TRAINING_REPORT, run_dir / TRAINING_REPORT, model_dir / STATE_FILE):
        if path.is_file():
            try:
                report = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{path} is not valid JSON ({exc})") from None
            if path.name == STATE_FILE:  # same fields as the final report, under other names
                step = report.get("step") or 0
                report |= {"steps": step, "tokens_per_step": report.get("tokens_seen", 0) // max(1, step),
                           "stopped": f"checkpoint at step {step}, run {report.get('stopped', 'unfinished')}"}
            return report
    return None


def loss_curves(run_dir: Path, report: dict) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(tokens seen, loss) points: training loss per step, validation loss per evaluation.

    Tokens seen per step come from RUN_DIR/metrics.jsonl: a logged `tokens_seen` if present,
    else tokens_per_s x the step's seconds (train.py logs both; a run resumed with another
    --tokens-per-step changes it midway, so step x tokens_per_step would be wrong). Without
    metrics, the report's subsampled losses are placed at step x tokens_seen / steps.
    """
    records: dict[int, dict] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
                records[int(rec["step"])] = rec | {"loss": float(rec["loss"])}  # a resumed run rewrites steps: the last wins
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    x: dict[int, float] = {}
    train: dict[int, float] = {}
    if records:
        # A step trains whole blocks: snapping to a multiple of block_size undoes the rounding
        # of the logged tokens_per_s and time (4,095.7 -> 4,096).
        block = (report.get("settings") or {}).get("block_size") or 1
        seen, prev_time = 0.0, 0.0
        for step in sorted(records):
            rec = records[step]
            if "tokens_seen" in rec:
                seen = float(rec["tokens_seen"])
            elif "tokens_per_s" in rec and "time" in rec:
                seen += round(float(rec["tokens_per_s"]) * (float(rec["time"]) - prev_time) / block) * block
                prev_time = float(rec["time"])
            else:
                seen = step * (report.get("tokens_per_step") or 0)
            x[step], train[step] = round(seen), rec["loss"]
    per_step = (report.get("tokens_seen") or 0) / max(1, report.get("steps") or 1) or report.get("tokens_per_step") or 0
    if not train and report.get("losses"):
        losses, steps = report["losses"], report.get("steps") or len(report["losses"])
        every = 1 if len(losses) >= steps else math.ceil(steps / 500)  # train.py keeps <= 500 points
        train = {i * every + 1: float(v) for i, v in enumerate(losses)}
    evals = [e for e in report.get("evals", []) if "val_loss" in e]
    if report.get("validation"):
        evals.append(report["validation"])
    val = {int(e["step"]): float(e["val_loss"]) for e in evals}
    at = lambda step: x.get(step, round(step * per_step))  # noqa: E731
    return [(at(s), v) for s, v in sorted(train.items())], [(at(s), v) for s, v in sorted(val.items())]


def plot_losses(train, val, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        x, y = zip(*train)
        # Debiased exponential moving average (TensorBoard's smoothing), its weight scaled to the
        # number of points so a short run is not flattened: 50 steps -> 0.6, 400+ -> 0.95.
        w = min(0.95, max(0.0, 1 - 20 / len(y)))
        ema, smooth = 0.0, []
        for t, v in enumerate(y, 1):
            ema = w * ema + (1 - w) * v
            smooth.append(ema / (1 - w**t))
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(x, smooth, color="tab:blue", label=f"training loss (EMA {w:.2f})" if w else "training loss")
    if val:
        x, y = zip(*val)
        ax.plot(x, y, "o-", color="tab:orange", label="validation loss")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def perplexity_section(model_dir: Path, base: str | None, label=None) -> str:
    """The eval report's table; `label(model)` names a row's model (default: as recorded)."""
    report = read_eval_report(model_dir)
    cmd = "wikigpt evaluate " + (f"--model {base} " if base else "") + f"--model {model_dir} --split test"
    if not report or not isinstance(report.get("latest"), dict):
        return f"Not evaluated yet. To measure it on the WikiText-103 test set:\n\n    {cmd}\n"
    latest = report["latest"]
    key = result_key(latest)
    rows = [r for r in report.get("others", []) if isinstance(r, dict) and r.get("model") != latest["model"]
            and result_key(r) == key]
    rows = rows + [latest] + [r for r in report.get("results", []) if isinstance(r, dict) and result_key(r) != key]
    lines = ["| model | data | tokens scored | window/stride | perplexity | word ppl | bits/byte |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = (label or str)(r["model"]) + (" (base)" if base and _same_model(r["model"], base) else "")
        what = f"{r['data']} {r.get('split') or ''}".strip()
        partial = "" if r.get("complete", True) else " (partial)"
        lines.append(f"| {name} | {what} | {r['n_tokens']:,}{partial} | {r['window']}/{r['stride']} | "
                     f"{fmt_ppl(r['perplexity'])} | {fmt_ppl(r['word_perplexity'])} | {r['bits_per_byte']:.4f} |")
    note = ("\nPerplexity is per token of each model's own tokenizer; word perplexity and bits per byte "
            "divide the same total loss by the text's words and bytes, so they compare models with "
            "different vocabularies. Sliding window as in the Hugging Face perplexity guide "
            "(see `wikigpt evaluate --help`).\n")
    if base and not any(_same_model(r["model"], base) for r in rows):
        note += f"\nFor the base model's row, evaluate both in one command:\n\n    {cmd}\n"
    return "\n".join(lines) + "\n" + note


def _same_model(a: str, b: str) -> bool:
    """Two --model spellings of one model (runs/x/final and ./runs/x/final/ are the same)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def training_section(report: dict | None, png: str | None) -> str:
    if report is None:
        return "No training_report.json found: the loss curve and training numbers are missing.\n"
    r, st, data = report, report.get("settings", {}), report.get("data")
    val = r.get("validation") or (r.get("evals") or [None])[-1]
    start = (f"fine-tuned from {st.get('model')}" if st.get("init", "pretrained") == "pretrained"
             else f"random weights ({st.get('architecture') or st.get('model')}, {st.get('config_overrides') or 'default config'})")
    losses = r.get("losses") or []
    items = [
        ("started from", start),
        ("data", data and f"{data.get('source')}: {data.get('train_tokens', 0):,} training tokens, {data.get('epochs')} epochs"),
        ("steps", f"{r.get('steps')} of {r.get('max_steps')} ({r.get('stopped')})"),
        ("tokens seen", f"{r.get('tokens_seen', 0):,}"),
        ("parameters", r.get("n_params") and f"{r['n_params'] / 1e6:.1f} M"),
        ("speed", r.get("tokens_per_second") and f"{r['tokens_per_second']:,} tokens/s on {r.get('device')}, "
                                                  f"{r.get('precision')}, {r.get('train_seconds', 0) / 60:.1f} min"),
        ("training loss", losses and f"{losses[0]} at the start, {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                                     "(mean of the last 10 recorded steps)"),
        ("validation", val and f"loss {val.get('val_loss')}, perplexity {val.get('val_ppl')} at step {val.get('step')} "
                               f"over {val.get('val_tokens', 0):,} tokens (non-overlapping blocks: less context per "
                               "token than the sliding-window test perplexity below)"),
    ]
    text = "\n".join(f"- **{k}**: {v}" for k, v in items if v) + "\n"
    if png:
        text += f"\n![training and validation loss against tokens seen]({png})\n"
    return text


def samples_section(lm, prompts: list[str], seed: int, max_new_tokens: int) -> str:
    from .textfilter import clean_continuation
    from .quality import continue_batch
    from .decoding import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)
    conts = continue_batch(lm, prompts, params)
    out = [f"Default decoding ({params.describe()}), seed {seed}, at most {max_new_tokens} new tokens; "
           "as users see them (blank-line runs collapsed).\n"]
    for prompt, ids in zip(prompts, conts):
        text = prompt + clean_continuation(lm.tokenizer.decode(ids, skip_special_tokens=True))
        out.append(_fence(text))
    return "\n\n".join(out) + "\n"


def decoding_section(lm, prompts: list[str], seed: int, max_new_tokens: int) -> str:
    from .quality import decoding_check, format_table

    stats, _ = decoding_check(lm, prompts, samples=3, seed=seed, max_new_tokens=max_new_tokens, n=4)
    return (f"Raw continuations (before blank-line collapsing) of the {len(prompts)} prompts, "
            f"{max_new_tokens} new tokens, "
            f"3 samples per prompt (seed {seed}) for sampling. rep-4: share of repeated 4-token phrases; "
            "blank-line runs: places with 2+ blank lines in a row. Reproduce: "
            f"`wikigpt decoding-check --model {lm.name} --max-new-tokens {max_new_tokens} --seed {seed}`.\n\n"
            + format_table(stats) + "\n")


def render(s: ReportSettings) -> tuple[Path, str]:
    run_dir = Path(s.run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{s.run_dir}: no such run folder")
    model_dir = find_model_dir(run_dir, s.model)
    out = Path(s.output).expanduser() if s.output else run_dir / "report.md"
    treport = read_training_report(run_dir, model_dir)
    png_rel = None
    if treport is not None:
        train, val = loss_curves(run_dir, treport)
        png = plot_losses(train, val, f"{run_dir.resolve().name}: loss against tokens seen", out.with_name(out.stem + "-loss.png"))
        png_rel = os.path.relpath(png, out.parent)
    st = (treport or {}).get("settings", {})
    base = st.get("model") if st.get("init", "pretrained") == "pretrained" else None

    from .modeling import load_model

    lm = load_model(s.model_copy(update={"model": str(model_dir)}))
    parts = [
        f"# wikigpt run report: {run_dir.resolve().name}\n",
        f"Model: `{model_dir}`, {lm.n_params / 1e6:.1f} M parameters, context {lm.context_length} tokens.\n",
        "## Training\n", training_section(treport, png_rel),
        "## Perplexity\n", perplexity_section(model_dir, base),
        "## Sample continuations\n", samples_section(lm, s.prompt, s.seed, s.max_new_tokens),
    ]
    if s.decoding_check:
        parts += ["## Decoding quality\n", decoding_section(lm, s.prompt, s.seed, s.max_new_tokens)]
    parts += ["## Reproduce\n", f"    wikigpt report {s.run_dir}" + (f" --model {s.model}" if s.model else "") + "\n\n"]
    return out, "\n".join(parts)


def run(s: ReportSettings) -> int:
    out, text = render(s)
    write_atomic(out, text)
    print(f"wikigpt report: wrote {out}", file=sys.stderr)
    return 0
