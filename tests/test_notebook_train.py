"""notebooks/train.ipynb runs top to bottom (with nbclient, as Jupyter would) on the tiny model."""

import nbformat

from .conftest import CORPUS, REPO

NOTEBOOK = REPO / "notebooks" / "train.ipynb"


def test_train_notebook_executes(tiny_model_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    text = tmp_path / "wiki.txt"
    text.write_text("".join(f" \n = Article {k} = \n \n{CORPUS}" for k in range(12)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    params[0].source = (
        f"MODEL = {str(tiny_model_dir)!r}\nPRESET = 'smoke'\n"
        f"DATA = {{'train_file': {str(text)!r}, 'validation_split_percent': 20}}\n"
        f"OVERRIDES = {{'max_steps': 4, 'device': 'cpu', 'progress': False, 'cache_dir': {str(tmp_path / 'cache')!r}}}\n"
        f"OUTPUT_DIR = {str(tmp_path / 'run')!r}\nPROMPT = 'Data Science is'\n"
    )
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the plot
    for name, value in {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    printed = "\n".join(o.get("text", "") for o in outputs)
    assert "max_steps: 4" in printed and "block_size: 64" in printed  # override and preset both applied
    assert "train:" in printed and "articles (cache built)" in printed
    assert "4 steps, 2,048 tokens" in printed and "validation perplexity" in printed
    assert "Data Science is" in printed
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
    assert (tmp_path / "run" / "final" / "training_report.json").is_file()


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
