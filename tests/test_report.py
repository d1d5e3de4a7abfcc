"""`wikigpt report` on a real (smoke) training run of the tiny model, evaluated next to its base (conftest)."""

import shutil

import pytest

from wikigpt import cli
from wikigpt.report import loss_curves, read_training_report


PROMPTS = ["--prompt", "Data Science is", "--prompt", "The history of"]


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def test_report_has_curves_base_table_and_samples(run_dir, tiny_model_dir, capsys):
    assert cli.main(["report", str(run_dir), *PROMPTS, "--max-new-tokens", "10", "--no-decoding-check"]) == 0
    md = (run_dir / "report.md").read_text()
    for heading in ("## Training", "## Perplexity", "## Sample continuations", "## Reproduce"):
        assert heading in md
    assert "## Decoding quality" not in md
    assert f"fine-tuned from {tiny_model_dir}" in md and "**tokens seen**: 3,072" in md  # 6 steps x 512
    assert f"| {tiny_model_dir} (base) |" in md and f"| {run_dir / 'final'} |" in md
    assert "```text\nData Science is" in md and "```text\nThe history of" in md
    png = run_dir / "report-loss.png"
    assert "](report-loss.png)" in md and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (480, 840)  # 7 x 4 inches at 120 dpi


def test_report_with_decoding_check_and_custom_output(run_dir, tmp_path):
    out = tmp_path / "out" / "r.md"
    assert cli.main(["report", str(run_dir), "--prompt", "Data Science is", "--max-new-tokens", "8",
                     "--output", str(out)]) == 0
    md = out.read_text()
    assert "## Decoding quality" in md and "| greedy (the original)" in md and "](r-loss.png)" in md
    assert (out.parent / "r-loss.png").is_file()


def test_loss_curves_are_against_tokens_seen(run_dir, tmp_path):
    report = read_training_report(run_dir, run_dir / "final")
    train, val = loss_curves(run_dir, report)
    assert [x for x, _ in train] == [512 * s for s in range(1, 7)]
    assert [y for _, y in train] == pytest.approx(report["losses"])
    assert val[-1] == (6 * 512, pytest.approx(report["validation"]["val_loss"]))
    copy = tmp_path / "copy"  # without metrics.jsonl the report's own losses are used
    shutil.copytree(run_dir / "final", copy / "final")
    assert loss_curves(copy, report) == (train, val)


def test_unevaluated_model_gets_the_command_to_evaluate_it(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "final", copy / "final")
    (copy / "final" / "eval_report.json").unlink()
    assert cli.main(["report", str(copy), *PROMPTS[:2], "--max-new-tokens", "4", "--no-decoding-check"]) == 0
    md = (copy / "report.md").read_text()
    assert "Not evaluated yet" in md and "wikigpt evaluate --model " in md and "--split test" in md


def test_report_errors_exit_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no model" in capsys.readouterr().err
    bad = tmp_path / "bad" / "final"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{}")
    (bad / "training_report.json").write_text("{not json")
    assert cli.main(["report", str(bad.parent)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_run_without_final_model_reports_its_newest_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    shutil.copy(run_dir / "metrics.jsonl", copy / "metrics.jsonl")
    assert cli.main(["report", str(copy), *PROMPTS[:2], "--max-new-tokens", "4", "--no-decoding-check"]) == 0
    md = (copy / "report.md").read_text()
    assert "checkpoints/step-0000006" in md and "(checkpoint at step 6, run completed)" in md
    assert "**tokens seen**: 3,072" in md and "](report-loss.png)" in md
