"""The notebooks run start to end in a real Jupyter kernel (nbclient), with the real SmolLM2-135M,
and show what they say; the committed files carry their outputs.

Each notebook gets one extra cell, here only, that prints the values the test checks as JSON.
The kernel inherits this process's environment (the suite's XLA_FLAGS, JAXLLM_PRECOMPILE=0 and
program cache) and imports this checkout's jaxllm.
"""

import json
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# notebook -> the expression its probe cell prints (names from the notebook's own cells)
PROBES = {
    "quickstart.ipynb": """{"texts": [o.outputs[0].text for o in outputs], "stream": "".join(pieces),
        "reply": reply.outputs[0].text, "same_top": [t for t, _ in engine_top] == [int(t) for t in forward_top],
        "max_diff": max_diff, "loss": float(loss), "norm": float(norm), "layers": len(layer_norms)}""",
    "sharding.ipynb": """{"devices": jax.device_count(), "same": same_tokens, "single": single,
        "kv_heads": k_pages.shape[0], "per_device": per_device}""",
    "finetune_then_serve.ipynb": """{"losses": losses, "base": base, "tuned": tuned,
        "files": sorted(os.listdir(adapter_dir))}""",
    "batch_job.ipynb": """{"input_ids": input_ids, "ids": ids, "killed": len(killed_lines), "status": job.returncode,
        "bad": bad, "summary": summary, "tokens": tokens, "ordered": [r["custom_id"] for r in results]}""",
}


def run_notebook(name: str, model_path, tmp_path) -> dict:
    """Execute notebooks/name in a fresh kernel; the probe's values. The kernel's temporary files
    (the notebooks' working directories) go under tmp_path, so a run leaves nothing in /tmp."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import json\nprint('PROBE', json.dumps({PROBES[name]}))"))
    env = {**os.environ, "JAXLLM_NOTEBOOK_MODEL": str(model_path), "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute(
        env=env
    )
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.get("name") == "stdout")
    return json.loads(printed.split("PROBE", 1)[1])


def test_every_notebook_is_tested_and_saved_with_its_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PROBES)
    for name in PROBES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.execution_count is not None, f"{name}: a code cell was not run before saving"
                assert not any(o.output_type == "error" for o in cell.outputs), f"{name}: a cell saved an error"


@pytest.mark.slow
def test_quickstart(smollm2_path, tmp_path):
    got = run_notebook("quickstart.ipynb", smollm2_path, tmp_path)
    assert all(got["texts"]) and got["stream"] and got["reply"]
    assert "Paris" in got["texts"][0]
    # the engine's logprobs=10 and the pure forward: the same top-10 tokens and probabilities
    assert got["same_top"] and got["max_diff"] < 1e-4
    assert 0 < got["loss"] < 20 and got["norm"] > 0 and got["layers"] == 30


@pytest.mark.slow
def test_sharding(smollm2_path, tmp_path):
    got = run_notebook("sharding.ipynb", smollm2_path, tmp_path)
    assert got["devices"] == 8  # the first cell's XLA_FLAGS (or the suite's) before JAX started
    assert got["same"] and all(got["single"])  # TP=2 gives the TP=1 tokens
    assert got["kv_heads"] == 4 and [shape[0] for shape in got["per_device"]] == [2, 2]  # 3 KV heads -> 4, halved


@pytest.mark.slow
def test_finetune_then_serve(smollm2_path, tmp_path):
    got = run_notebook("finetune_then_serve.ipynb", smollm2_path, tmp_path)
    assert got["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert got["losses"][-1] < got["losses"][0] / 2
    # the served adapter answers in the trained format; the base model, on the same batch, does not
    assert all(text.startswith("ANSWER: ") for text in got["tuned"]), got["tuned"]
    assert not any(text.startswith("ANSWER") for text in got["base"]), got["base"]


@pytest.mark.slow
def test_batch_job(smollm2_path, tmp_path):
    got = run_notebook("batch_job.ipynb", smollm2_path, tmp_path)
    ids, summary = got["input_ids"], got["summary"]
    assert got["status"] == -9 and 3 <= got["killed"] < len(ids)  # SIGKILL'ed with results on disk
    # after the rerun: each custom_id of the input exactly once in the file, and in input order from run_batch
    assert sorted(got["ids"]) == sorted(ids) and len(set(got["ids"])) == len(got["ids"]) and got["ordered"] == ids
    # the torn line was dropped and its request run again: the kill left killed - 1 whole results
    assert summary["skipped"] == got["killed"] - 1 and summary["done"] + summary["failed"] == len(ids) - summary["skipped"]
    bad = got["bad"]["response"]
    assert bad["status_code"] == 400 and "temperature" in bad["body"]["error"]["message"], bad
    assert len(got["tokens"]) == len(ids) - 1 and all(0 < n <= 34 for n in got["tokens"].values())
    assert summary["output_tokens"] <= sum(got["tokens"].values()) and summary["generate_s"] > 0
