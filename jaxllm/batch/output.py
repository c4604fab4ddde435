"""A batch job's results on disk: OpenAI's batch output lines, appended so that a job killed at any
moment (SIGKILL included) and run again writes every request exactly once.

Each result is one line, `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`; lines are appended in groups, each group written, flushed and fsync'ed before the next.
A kill can only tear the last line: `ResultFile.recover` keeps the complete lines (those ending in a
newline) and truncates the rest away, and the job skips the custom_ids already there. In a run of
several processes each writes its own part file (`OUTPUT.part-R-of-P`) and process 0 merges the parts
into the output at the end (`merge_parts`, itself restartable: what the output already has is not
appended again; a part is deleted only once the output holds it).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable

from jaxllm.serve.protocol import ServeError


def result_line(custom_id: str, status: int, body: dict, error: ServeError | None = None) -> dict:
    """One output line: the response the server would have sent (status, body) and, for a refused or
    failed request, OpenAI's batch `error` object {code, message}."""
    request_id = body.get("id") if status == 200 else None
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or "req_" + uuid.uuid4().hex, "body": body},
            "error": None if error is None else {"code": error.code or error.type,
                                                 "message": error.message}}  # fmt: skip


def error_line(custom_id: str, error: ServeError) -> dict:
    return result_line(custom_id, error.status, error.body(), error)


def _complete_lines(path: Path) -> tuple[list[dict], int, int]:
    """(results, bytes of the complete lines, file size) of an output file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # what follows the last newline is a torn line
    results = []
    for number, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            result = json.loads(raw)
        except ValueError:
            raise ValueError(f"{path}:{number} is not a batch result line; a batch output file holds only the job's "
                             "results (give another --output, or remove this file)") from None  # fmt: skip
        if not isinstance(result, dict) or not isinstance(result.get("custom_id"), str):
            raise ValueError(f"{path}:{number} has no custom_id; it is not a batch result line")
        results.append(result)
    return results, end, len(data)


def read_results(path: str | Path) -> list[dict]:
    """The complete result lines of a file (none when it does not exist); a torn last line is ignored."""
    path = Path(path)
    return _complete_lines(path)[0] if path.is_file() else []


class ResultFile:
    """An append-only results file owned by this process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def recover(self) -> list[dict]:
        """The results already written; a torn last line (a kill in mid-write) is truncated away."""
        if not self.path.is_file():
            return []
        results, end, size = _complete_lines(self.path)
        if end < size:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return results

    def append(self, results: Iterable[dict]) -> None:
        """Write the results as lines, then flush them to the disk (one fsync for the group)."""
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in results)
        if not data:
            return
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def part_path(output: str | Path, rank: int, num_processes: int) -> Path:
    return Path(f"{output}.part-{rank}-of-{num_processes}")


def part_paths(output: str | Path) -> list[Path]:
    """Every part file of `output` (from this run or an earlier one with another process count)."""
    output = Path(output)
    return sorted(output.parent.glob(output.name + ".part-*-of-*"))


def merge_parts(output: str | Path, order: dict[str, int]) -> int:
    """Append the parts' results that the output lacks, in input order (`order`: custom_id -> index),
    then delete the parts; the number of lines appended."""
    target = ResultFile(output)
    have = {r["custom_id"] for r in target.recover()}
    parts = part_paths(output)
    pending: dict[str, dict] = {}
    for part in parts:
        for result in read_results(part):
            if result["custom_id"] not in have:
                pending.setdefault(result["custom_id"], result)
    try:
        target.append(sorted(pending.values(), key=lambda r: order.get(r["custom_id"], len(order))))
    finally:
        target.close()
    for part in parts:
        part.unlink(missing_ok=True)
    return len(pending)
