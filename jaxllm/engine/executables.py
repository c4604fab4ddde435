"""Compiled programs: all of an engine's programs compiled (or loaded) before it serves, the
persistent cache on disk that lets the next process skip tracing and compiling, and LLM.save's copies.

`Programs` holds one executable per program key (engine/buckets.py). `prepare(shapes)` makes every
one of them: each is read from the persistent cache when it holds it (deserializing needs neither
tracing nor compiling), else lowered and compiled, on a pool of threads (XLA compiles and loads
outside the GIL), with one progress bar; what was compiled is written back to the cache.

The persistent cache (`CompileCache`) lives in the user's cache directory: `$JAXLLM_COMPILE_CACHE`,
else `$XDG_CACHE_HOME/jaxllm/programs`, else `~/.cache/jaxllm/programs`; `LLM(compilation_cache_dir=
...)` chooses another, and the value "off" (argument or variable) turns it off. An engine's programs
sit in a directory named by a digest of everything they depend on: jaxllm's own source, the JAX
and jaxlib versions, XLA_FLAGS, the module switches programs are traced under (DECODES_APART,
ROPE_IN_KV_WRITE, WEIGHT_ONLY_MAX_ROWS, GROUPED_DOTS, WEIGHT_ONLY_INPUT_LAST, SMALL_GROUP_DOT_ROWS,
which benchmarks flip), the devices, and the engine's description (model config, weight and cache
shapes, dtypes and shardings, buckets, backend). Any change of these misses cleanly. Files are
written to a temporary name and renamed into place, so processes sharing the cache see whole files
or none; a file that fails to load is compiled again and replaced. The cache is kept under
`$JAXLLM_COMPILE_CACHE_GB` (default 8) gigabytes: after a write, the least recently used engines'
directories are removed until it fits.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxllm.engine.buckets import shape_from_json

logger = logging.getLogger(__name__)

CACHE_ENV = "JAXLLM_COMPILE_CACHE"
CACHE_SIZE_ENV = "JAXLLM_COMPILE_CACHE_GB"
DEFAULT_CACHE_GB = 8.0
OFF = "off"
FILE_FORMAT = 1  # bump when the file layout changes
_HEADER_BYTES = 8


def default_cache_dir() -> Path | None:
    """Where programs are cached when LLM() does not say: $JAXLLM_COMPILE_CACHE, else the XDG cache
    directory; None when the variable says "off"."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in (OFF, "", "0", "false", "none") else Path(value).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "jaxllm" / "programs"


def resolve_cache_dir(argument: str | None) -> Path | None:
    """The cache directory for LLM(compilation_cache_dir=argument): the argument ("off" turns the cache
    off), else default_cache_dir()."""
    if argument is None:
        return default_cache_dir()
    if str(argument).strip().lower() == OFF:
        return None
    return Path(argument).expanduser()


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """A digest of jaxllm's and pallas_kernels' Python sources: a program compiled by other code
    must not be reused."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import jaxllm
        import pallas_kernels

        digest = hashlib.sha256()
        for package in (jaxllm, pallas_kernels):
            root = Path(package.__file__).parent
            for path in sorted(root.rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
        _SOURCE_DIGEST = digest.hexdigest()
    return _SOURCE_DIGEST


def environment_description() -> dict:
    """What a compiled program depends on besides the engine itself: the code, JAX, XLA's flags,
    and the module switches a program is traced under (benchmarks flip them, a process at a time:
    a program made under one setting must not be loaded under another)."""
    import jaxlib

    from jaxllm.layers import attention, linear
    from jaxllm.models import transformer

    switches = {"decodes_apart": attention.DECODES_APART[0], "rope_in_kv_write": dict(attention.ROPE_IN_KV_WRITE),
                "weight_only_max_rows": transformer.WEIGHT_ONLY_MAX_ROWS,
                "grouped_dots": linear.GROUPED_DOTS[0],
                "weight_only_input_last": dict(linear.WEIGHT_ONLY_INPUT_LAST),
                "small_group_dot_rows": linear.SMALL_GROUP_DOT_ROWS}  # fmt: skip
    return {"format": FILE_FORMAT, "source": source_digest(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "x64": bool(jax.config.jax_enable_x64), "switches": switches,
            "processes": [jax.process_index(), jax.process_count()]}  # fmt: skip


def digest_of(description: Any) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


class CompileCache:
    """Serialized programs on disk, one directory per engine description (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        if max_bytes is None:
            max_bytes = int(float(os.environ.get(CACHE_SIZE_ENV, DEFAULT_CACHE_GB)) * (1 << 30))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def directory(self, engine_key: str) -> Path:
        return self.root / engine_key[:32]

    @staticmethod
    def file_name(shape, options: dict | None) -> str:
        return digest_of([shape.to_json(), options or {}])[:32] + ".bin"

    def load(self, engine_key: str, shape, options: dict | None = None) -> tuple[dict, bytes] | None:
        """(header, payload) of `shape`'s program compiled with XLA `options`, or None when it is not
        cached (or unreadable)."""
        path = self.directory(engine_key) / self.file_name(shape, options)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            size = int.from_bytes(data[:_HEADER_BYTES], "little")
            header = json.loads(data[_HEADER_BYTES : _HEADER_BYTES + size])
            if header.get("engine") != engine_key or shape_from_json(header["shape"]) != shape:
                return None
            os.utime(path)  # recently used: evicted last
            return header, data[_HEADER_BYTES + size :]
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring the damaged cached program %s (%s)", path, e)
            return None

    def store(self, engine_key: str, shape, options: dict | None, header: dict, payload: bytes) -> None:
        directory = self.directory(engine_key)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            text = json.dumps({**header, "engine": engine_key, "shape": shape.to_json()}).encode()
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(len(text).to_bytes(_HEADER_BYTES, "little") + text + payload)
            os.replace(tmp, directory / self.file_name(shape, options))
        except OSError as e:  # a full or read-only disk costs the cache, never the engine
            logger.warning("could not write the program cache in %s: %s", directory, e)

    def write_description(self, engine_key: str, description: dict) -> None:
        directory = self.directory(engine_key)
        path = directory / "engine.json"
        if path.is_file():
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(description, f, indent=1, sort_keys=True, default=str)
            os.replace(tmp, path)
        except OSError:
            pass

    def size(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(s.st_size for d in self.root.iterdir() if d.is_dir() for s in _file_stats(d))

    def evict(self, keep: str | None = None) -> None:
        """Remove the least recently used engine directories (never `keep`'s) until the cache fits."""
        with self._lock:
            if not self.root.is_dir():
                return
            entries = []
            for directory in self.root.iterdir():
                if not directory.is_dir():
                    continue
                files = _file_stats(directory)
                last_used = max((s.st_mtime for s in files), default=0.0)
                entries.append((last_used, sum(s.st_size for s in files), directory))
            total = sum(size for _, size, _ in entries)
            for _, size, directory in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if keep is not None and directory == self.directory(keep):
                    continue
                shutil.rmtree(directory, ignore_errors=True)
                total -= size
                logger.info("program cache over %.1f GB: removed %s", self.max_bytes / (1 << 30), directory)


def _file_stats(directory: Path) -> list[os.stat_result]:
    """The stats of the files in `directory`, leaving out any that another process renamed or
    removed meanwhile (processes share the cache: a temporary file is renamed into place, a
    directory evicted)."""
    stats = []
    try:
        for path in directory.iterdir():
            try:
                status = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(status.st_mode):
                stats.append(status)
    except FileNotFoundError:
        pass
    return stats


def compile_cached(lowered, cache: CompileCache | None, devices: list | None = None):
    """`lowered.compile()`, through the cache when there is one: keyed by a digest of the lowered
    program and the environment (for small programs outside an engine's set, such as the random
    weights of load_format='dummy'; their lowering is cheap, their compiling is not). `devices`: where
    a loaded program runs (default: the default device)."""
    if cache is None:
        return lowered.compile()
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    from jaxllm.engine.buckets import HeadShape

    key = digest_of([environment_description(), lowered.as_text()])
    shape = HeadShape(0)  # the file's name within the key's directory: one program a key
    found = cache.load(key, shape)
    if found is not None:
        try:
            devices = devices or jax.devices()[:1]
            return deserialize_and_load(found[1], lowered.in_tree, lowered.out_tree, execution_devices=devices)
        except Exception as e:
            logger.warning("compiling again: a cached program did not load (%s)", e)
    exe = lowered.compile()
    try:
        payload, _, _ = serialize(exe)
    except Exception:
        return exe
    cache.store(key, shape, None, {"out_keys": []}, payload)
    return exe


class Programs:
    """An engine's compiled programs by key.

    Args:
      lower: key -> jax.stages.Lowered (traces and lowers the program).
      trees: key -> (in_tree, out_tree) given the output keys: what deserializing needs.
      compiler_options: key -> XLA options for that program (or None).
      devices: the devices the programs run on.
      description: the engine's description (the cache key, with environment_description()).
      cache: the persistent cache, or None.
    """

    def __init__(self, lower: Callable, trees: Callable, compiler_options: Callable, devices: list,
                 description: dict, cache: CompileCache | None = None):  # fmt: skip
        self._lower = lower
        self._trees = trees
        self._compiler_options = compiler_options
        self.devices = devices
        self.cache = cache
        self.description = {**environment_description(), **description}
        self.engine_key = digest_of(self.description)
        self.executables: dict = {}
        self.compile_seconds = 0.0  # wall time spent compiling (and loading) programs
        self.num_compiled = 0  # programs compiled by this engine (not loaded)
        self.num_loaded = 0  # programs loaded from the persistent cache or a saved engine
        self.seconds: dict = {}  # key -> ("compiled" | "loaded", seconds it took)
        self._lock = threading.Lock()

    def __contains__(self, shape) -> bool:
        return shape in self.executables

    def __len__(self) -> int:
        return len(self.executables)

    def get(self, shape):
        """The executable of `shape`, made now if it is not ready (a key outside the prepared set)."""
        exe = self.executables.get(shape)
        if exe is None:
            started = time.perf_counter()
            exe = self._make(shape)
            with self._lock:
                self.executables[shape] = exe
                self.compile_seconds += time.perf_counter() - started
        return exe

    def prepare(self, shapes: list, progress: bool = True, threads: int | None = None) -> None:
        """Make every program of `shapes` not yet ready, several at once, with one progress bar."""
        from tqdm.auto import tqdm

        todo = [s for s in dict.fromkeys(shapes) if s not in self.executables]
        if not todo:
            return
        if self.cache is not None:
            self.cache.write_description(self.engine_key, self.description)
        threads = threads or max(1, min(len(todo), os.cpu_count() or 2))
        started = time.perf_counter()
        compiled0, loaded0 = self.num_compiled, self.num_loaded
        bar = tqdm(total=len(todo), desc="preparing programs", unit="program", disable=None if progress else True,
                   bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")  # fmt: skip
        with bar, concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxllm-compile") as pool:
            futures = {pool.submit(self._make, shape): shape for shape in todo}
            for future in concurrent.futures.as_completed(futures):
                exe = future.result()
                with self._lock:
                    self.executables[futures[future]] = exe
                bar.set_postfix_str(f"{self.num_loaded - loaded0} from the cache, {self.num_compiled - compiled0} "
                                    "compiled", refresh=False)  # fmt: skip
                bar.update()
        elapsed = time.perf_counter() - started
        self.compile_seconds += elapsed
        logger.info("programs ready: %d in %.1f s (%d loaded from the cache, %d compiled)", len(todo), elapsed,
                    self.num_loaded - loaded0, self.num_compiled - compiled0)  # fmt: skip
        if self.cache is not None and self.num_compiled > compiled0:
            self.cache.evict(keep=self.engine_key)

    def _make(self, shape):
        """Load `shape`'s program from the cache, else compile it (and store it there)."""
        started = time.perf_counter()
        options = self._compiler_options(shape)
        if self.cache is not None:
            found = self.cache.load(self.engine_key, shape, options)
            if found is not None:
                header, payload = found
                try:
                    exe = self._deserialize(shape, payload, header["out_keys"])
                    with self._lock:
                        self.num_loaded += 1
                        self.seconds[shape] = ("loaded", time.perf_counter() - started)
                    return exe
                except Exception as e:  # another XLA, a damaged file: compile it again
                    logger.warning("compiling %s again: its cached program did not load (%s)", shape, e)
        exe = self._compile(shape, options)
        with self._lock:
            self.num_compiled += 1
            self.seconds[shape] = ("compiled", time.perf_counter() - started)
        if self.cache is not None:
            serialized = self._serialize(shape, exe)
            if serialized is not None:
                self.cache.store(self.engine_key, shape, options, {"out_keys": serialized[1]}, serialized[0])
        return exe

    def _compile(self, shape, options: dict | None):
        lowered = self._lower(shape)
        if options:
            try:
                return lowered.compile(compiler_options=options)
            except jax.errors.JaxRuntimeError as e:  # an XLA without one of the options: its defaults
                if "No such compile option" not in str(e):
                    raise
                logger.warning("compiling %s with XLA's defaults: %s", shape, e)
        return lowered.compile()

    @staticmethod
    def _serialize(shape, exe) -> tuple[bytes, list[str]] | None:
        from jax.experimental.serialize_executable import serialize

        try:
            payload, _, out_tree = serialize(exe)
        except Exception as e:  # the backend cannot serialize this program: it is compiled each time
            logger.info("program %s is not serializable here (%s)", shape, e)
            return None
        example = jax.tree.unflatten(out_tree, list(range(out_tree.num_leaves)))
        out = example[0] if isinstance(example, tuple) else example
        return payload, sorted(out)

    def _deserialize(self, shape, payload: bytes, out_keys: list[str]):
        from jax.experimental.serialize_executable import deserialize_and_load

        in_tree, out_tree = self._trees(shape, out_keys)
        return deserialize_and_load(payload, in_tree, out_tree, execution_devices=self.devices)

    # ---- a saved engine's copies (LLM.save) ---------------------------------------------------------
    def save(self, directory) -> int:
        """Serialize every program into `directory`; returns how many (a backend that cannot
        serialize one leaves it out: a reloaded engine compiles it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = {"engine": self.engine_key, "programs": []}
        for i, (shape, exe) in enumerate(list(self.executables.items())):
            serialized = self._serialize(shape, exe)
            if serialized is None:
                continue
            (directory / f"program_{i}.bin").write_bytes(serialized[0])
            index["programs"].append({"file": f"program_{i}.bin", "shape": shape.to_json(), "out_keys": serialized[1]})
        (directory / "index.json").write_text(json.dumps(index, indent=1))
        return len(index["programs"])

    def load_saved(self, directory) -> int:
        """Load the programs `save` wrote, if they were made for this engine (same description)."""
        index_file = Path(directory) / "index.json"
        if not index_file.is_file():
            return 0
        index = json.loads(index_file.read_text())
        if index.get("engine") != self.engine_key:
            logger.info("the saved programs were made for another engine or JAX; compiling instead")
            return 0
        for entry in index["programs"]:
            shape = shape_from_json(entry["shape"])
            payload = (Path(directory) / entry["file"]).read_bytes()
            self.executables[shape] = self._deserialize(shape, payload, entry["out_keys"])
            self.num_loaded += 1
        return len(index["programs"])
