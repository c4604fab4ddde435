"""The notebooks run: their code cells, in order, in one namespace (what a kernel would do)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
def test_quickstart_notebook_runs(smollm2_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_NOTEBOOK_MODEL", str(smollm2_path))
    notebook = json.loads((NOTEBOOKS / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert all(out.outputs[0].text for out in namespace["outputs"])
    assert "".join(namespace["pieces"])
    assert 0 < float(namespace["loss"]) < 20 and float(namespace["norm"]) > 0
