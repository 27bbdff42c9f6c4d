"""The notebooks in docs/: committed executed (readers see results), and re-executed here with
nbclient in a real Jupyter kernel: no error, no warning, the key outputs present (the HTML
tables of the results, progress as lines without ipywidgets)."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from tests.helpers import ROOT

nbformat = pytest.importorskip("nbformat", reason="nbclient and ipykernel come with nngraft[test]")
nbclient = pytest.importorskip("nbclient", reason="nbclient and ipykernel come with nngraft[test]")

NOTEBOOK = ROOT / "docs" / "own-facts.ipynb"


def outputs(nb) -> list[tuple[int, str, str]]:
    """(cell index, output type, every text it carries) for each output of each code cell."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            texts = [out.get("text", ""), out.get("ename", ""), out.get("evalue", "")]
            texts += [v if isinstance(v, str) else "" for v in out.get("data", {}).values()]
            found.append((i, out["output_type"], "\n".join(texts)))
    return found


def html_captions(nb) -> list[str]:
    return [re.search(r"<caption>(.*?)</caption>", out["data"]["text/html"]).group(1)
            for cell in nb.cells for out in cell.get("outputs", []) if "text/html" in out.get("data", {})
            and "<caption>" in out["data"]["text/html"]]


def check_key_outputs(nb) -> None:
    everything = "\n".join(text for _, _, text in outputs(nb))
    assert not [kind for _, kind, _ in outputs(nb) if kind == "error"]
    for unwanted in ("Traceback", "Warning", "ipywidgets", "IProgress"):
        assert unwanted not in everything, unwanted
    captions = "\n".join(html_captions(nb))
    for caption in ("FinetuneResult: 15 epochs (full)", "GraftResult: 5 prompts, vocabulary", "GridResult: 6 specs × 5 prompts",
                    "GenerationResult: 5 rows × 4 new tokens", "Attribution of logprob", "GraftSpec &#x27;localized&#x27;"):
        assert caption in captions, caption
    assert re.search(r"found \d+ of \d+ units, recovery", captions)
    assert "finetuning: epoch 1/15, step 1/15" in everything and "finetuning: epoch 15/15" in everything
    assert re.search(r"grafting: 30/30 rows \(100%\), elapsed", everything)
    recovery = re.search(r"recovery: (\{.*\})", everything).group(1)
    assert recovery.startswith("{'p': 0.0, 'f': 1.0, 'fe': ")


def test_the_committed_notebook_is_executed_with_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # in order, once
    assert all(cell.outputs for cell in code)
    check_key_outputs(nb)


def this_python_kernel(folder, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (the installed "python3" spec runs whatever
    `python` is first on PATH, which need not be the one with nngraft)."""
    spec = folder / "jupyter" / "kernels" / "nngraft-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nngraft test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(folder / "jupyter"))
    return "nngraft-test"


@pytest.mark.slow
def test_the_notebook_runs_in_a_kernel_without_errors_or_warnings(tmp_path, monkeypatch):
    kernel = this_python_kernel(tmp_path, monkeypatch)
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    check_key_outputs(nb)
