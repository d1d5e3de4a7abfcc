"""notebooks/inference.ipynb runs top to bottom (with nbclient, as Jupyter would) on the tiny model."""

import nbformat

from .conftest import CORPUS, REPO

NOTEBOOK = REPO / "notebooks" / "inference.ipynb"


def test_inference_notebook_executes(tiny_model_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki.test.raw").write_text("".join(f" \n = Article {k} = \n \n{CORPUS}" for k in range(4)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    params[0].source = (f"MODEL = {str(tiny_model_dir)!r}\nDATA = {str(data)!r}\nSPLIT = 'test'\n"
                        "MAX_TOKENS = 300\nPROMPT = 'Data Science is'\nSEED = 0\n")
    monkeypatch.setenv("WIKIGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "context 256 tokens" in text and "default:\nData Science is" in text
    assert "| greedy (the original)" in text
    assert "299 tokens scored" in text and "| perplexity" in text
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
