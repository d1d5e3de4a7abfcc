import io
import subprocess
import sys

import pytest

from wikigpt import cli


class RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_generate_streams_to_the_terminal(tiny_model_dir, monkeypatch):
    out = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    rc = cli.main(["generate", "Data Science is", "--model", str(tiny_model_dir), "--max-new-tokens", "30",
                   "--seed", "1"])
    assert rc == 0
    text = out.getvalue()
    assert text.startswith("Data Science is") and text.endswith("\n")
    # the prompt first, then growing text: several flushes before the end
    growing = [s for s in dict.fromkeys(out.flushed) if s]
    assert growing[0] == "Data Science is" and len(growing) > 3


def test_seed_is_reproducible_from_the_command_line(tiny_model_dir):
    cmd = [sys.executable, "-m", "wikigpt.cli", "generate", "Data Science is", "--model", str(tiny_model_dir),
           "--max-new-tokens", "20", "--seed", "1"]
    a, b = (subprocess.run(cmd, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert a.returncode == 0 and a.stdout == b.stdout


def test_env_vars_and_flags(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("WIKIGPT_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("WIKIGPT_MAX_NEW_TOKENS", "0")  # invalid: the flag below overrides it
    assert cli.main(["generate", "x", "--max-new-tokens", "3"]) == 0
    monkeypatch.setenv("WIKIGPT_MAX_NEW_TOKENS", "5")
    assert cli.main(["generate", "x", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and "greater than or equal to 0" in err


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/no/such/dir"], "could not load model '/no/such/dir': no such directory"),
    (["generate", "x", "--top-p", "0"], "--top-p"),
    (["generate", "", "--model", "."], "--prompt"),
    (["generate", "x", "--stop", ""], "stop strings must not be empty"),
])
def test_bad_input_exits_2_with_a_message(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_comes_from_the_settings_docs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "Nucleus sampling" in out and "WIKIGPT_TOP_P" in out
