"""Execute the notebooks in a real Jupyter kernel and save them with their outputs.

  python scripts/execute_notebooks.py                    # every notebook in notebooks/
  python scripts/execute_notebooks.py notebooks/quickstart.ipynb [...] [--timeout 900]

Each notebook runs start to end in a fresh `python3` kernel (nbclient) whose working directory is
the repository root and whose PYTHONPATH starts with it, so it imports this checkout's jaxllm; the
environment is passed on as it is (JAXLLM_NOTEBOOK_MODEL, JAXLLM_PRECOMPILE, XLA_FLAGS, ...). A
notebook whose cell raises is not saved.

The saved outputs are tidied so that they read as a person would see them and carry nothing of the
machine they ran on:
  - consecutive stream outputs of one stream (stdout or stderr) are merged into one;
  - a progress bar's carriage-return updates keep only their last state (tqdm redraws a line with
    "\\r"), and tqdm's "IProgress not found" warning (no ipywidgets in the kernel) is dropped;
  - local absolute paths (this checkout, the Python prefix, the home and temporary directories)
    are replaced by short placeholders; any left afterwards stops the script before saving.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
IPROGRESS_WARNING = re.compile(r"[^\n]*IProgress not found[^\n]*\n(?:[^\n]*from \.autonotebook import[^\n]*\n)?")


def local_paths() -> list[tuple[str, str]]:
    """(absolute path, placeholder) pairs, longest path first so that nested ones are replaced whole."""
    pairs = {str(ROOT): ".", sys.prefix: "<python>", sys.base_prefix: "<python>",
             str(Path.home()): "~", tempfile.gettempdir(): "<tmp>"}  # fmt: skip
    real = {os.path.realpath(path): name for path, name in pairs.items()}
    pairs.update(real)
    return sorted(((p, n) for p, n in pairs.items() if p not in ("", "/")), key=lambda pair: -len(pair[0]))


def final_progress_state(text: str) -> str:
    """Each line as a terminal would show it last: what follows its last carriage return."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def scrub(text: str, paths: list[tuple[str, str]]) -> str:
    for path, name in paths:
        text = text.replace(path, name)
    return text


def tidy_outputs(outputs: list, paths: list[tuple[str, str]]) -> list:
    """The cell's outputs merged, progress bars settled, warnings dropped, paths scrubbed."""
    tidied: list = []
    for output in outputs:
        if output.output_type == "stream":
            if tidied and tidied[-1].output_type == "stream" and tidied[-1].name == output.name:
                tidied[-1].text += output.text
                continue
            output = nbformat.from_dict(dict(output))
        tidied.append(output)
    kept = []
    for output in tidied:
        if output.output_type == "stream":
            output.text = scrub(final_progress_state(IPROGRESS_WARNING.sub("", output.text)), paths)
            if not output.text:
                continue
        elif output.output_type in ("execute_result", "display_data"):
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output.data[mime] = scrub(value, paths)
        kept.append(output)
    return kept


def leftover_paths(notebook, paths: list[tuple[str, str]]) -> list[str]:
    """The local paths still somewhere in the notebook's outputs (after scrubbing: none expected)."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") + "".join(v for v in output.get("data", {}).values() if isinstance(v, str))
            found += [f"cell {index}: {path}" for path, _ in paths if path in text]
    return found


def execute(path: Path, timeout: int) -> None:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
    client.execute(env=env)
    paths = local_paths()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = tidy_outputs(cell.outputs, paths)
    left = leftover_paths(notebook, paths)
    if left:
        raise SystemExit(f"{path.name}: local paths left in the outputs after scrubbing: {left}")
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="the notebooks (default: every one in notebooks/)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a cell may run (default 900)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            parser.error(f"{path} is not a notebook file (.ipynb)")
    import time

    for path in paths:
        started = time.perf_counter()
        execute(path.resolve(), args.timeout)
        print(f"{path}: executed and saved in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
