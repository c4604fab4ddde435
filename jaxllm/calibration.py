"""Calibration: TensorRT-LLM's `CalibConfig`, the static FP8 scales of a float checkpoint measured as it loads.

    LLM(model, quant_config=QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8"),
        calib_config=CalibConfig(calib_dataset="calibration.jsonl", calib_batches=64))

With a calib_config a float checkpoint gets what an NVIDIA ModelOpt FP8 export holds, measured on
the user's text: quant_algo FP8 scales each projection's input by one static scale (ModelConfig
quant_algo "FP8": the amax of that input over the calibration samples / 448; saturating beyond it)
instead of a scale per token, and an fp8 KV cache (kv_cache_quant_algo FP8, or
kv_cache_config.dtype 'fp8') stores each layer's K and V divided by their own scales (`k_scale`,
`v_scale`: the amax of the rotated keys and of the values / 448) instead of as they are. The weights
keep a scale per output channel (quantization.py). Without a calib_config, quant_algo FP8 scales
activations per token (FP8_PER_CHANNEL_PER_TOKEN) and the fp8 cache has scales of 1. Static scales
agree with bf16 as per-token ones do (benchmarks/RESULTS.md, "Calibration") and spare a step two
passes over each quantized input, its amax and its division (an H100 profile of the Llama-3.1-8B
shape: 6.1 ms of a 45 ms decode forward of 2,048 rows; "FP8 in a ModelOpt checkpoint's format").

How: the samples run through the float model on one device (`device` 'cuda': this process's first
device; 'cpu': the host's), one layer at a time (each read from the checkpoint as it is reached and
dropped after it, every sample's hidden states kept: a model need not fit the device whole), each
`decoder_layer` (the model's own code) with an observer in its adapter hook (every projection's
input) and its attention (the rotated keys and the values), padding masked out; then the checkpoint
loads quantized as it always does, the measured scales in place of the quantizer's placeholders
(checkpoints/loader.py, `scales`). The scales are the same at every tensor-parallel size (in a
multi-process run the leader measures them and sends them to the others: engine/builder.py), and
`LLM.save` keeps them.

The dataset is read from local files (nothing is downloaded): a text file (each paragraph, blank-line
separated, a sample; any suffix but .json, .jsonl and the tables' .csv, .tsv, .parquet, .arrow), a
.jsonl file (each line a string, or an object with a 'text' or 'article' field, or 'input_ids':
token ids used as they are), a .json file (a list of those), or a directory of .txt, .jsonl and
.json files (in name order). It is read, and a bad one refused, before anything is built. Each
sample is tokenized as a prompt is (special tokens added) and cut at min(calib_max_seq_length,
tokenizer_max_seq_length) tokens; calib_batches x calib_batch_size samples are used, a subset
drawn with random_seed (in file order) when the dataset holds more.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.quantization import FP8_MAX, INPUT_SCALE_SUFFIX, QUANTIZED_PARAMS, QuantAlgo, quantizes

logger = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".txt", ".jsonl", ".json")  # what a directory's files are read by
# Dataset files jaxllm does not read (the `datasets` library's other formats)
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow")
TEXT_FIELDS = ("text", "article")  # cnn_dailymail's samples are 'article's
# Padded lengths of a batch are powers of two from this (fewer programs to compile).
MIN_PADDED_LENGTH = 16


@dataclasses.dataclass
class CalibConfig:
    """TensorRT-LLM's `CalibConfig` (the LLM API's fields and defaults). `calib_dataset` is a local
    file or directory (module docstring); the default, 'cnn_dailymail', names a hub dataset, which
    jaxllm does not download, so it is refused naming what is allowed."""

    device: str = "cuda"
    calib_dataset: str = "cnn_dailymail"
    calib_batches: int = 512
    calib_batch_size: int = 1
    calib_max_seq_length: int = 512
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"CalibConfig.device={self.device!r} is invalid; allowed: 'cuda' (the engine's "
                             "device), 'cpu'")  # fmt: skip
        for name in ("calib_batches", "calib_batch_size", "calib_max_seq_length", "tokenizer_max_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibConfig.{name}={value!r} is invalid; allowed: an int >= 1")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ValueError(f"CalibConfig.random_seed={self.random_seed!r} is invalid; allowed: an int")
        if not isinstance(self.calib_dataset, (str, Path)):
            raise ValueError(f"CalibConfig.calib_dataset={self.calib_dataset!r} is invalid; allowed: the path of a "
                             "local file or directory (str or Path)")  # fmt: skip
        self.calib_dataset = str(self.calib_dataset)

    @property
    def num_samples(self) -> int:
        return self.calib_batches * self.calib_batch_size

    @property
    def max_length(self) -> int:
        return min(self.calib_max_seq_length, self.tokenizer_max_seq_length)


def as_calib_config(value) -> Optional[CalibConfig]:
    """LLM(calib_config=...): a CalibConfig, its fields as a dict, or None."""
    if value is None or isinstance(value, CalibConfig):
        return value
    if isinstance(value, dict):
        fields = [f.name for f in dataclasses.fields(CalibConfig)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise TypeError(f"CalibConfig got unknown field(s) {unknown}; allowed: {', '.join(fields)}")
        return CalibConfig(**value)
    raise TypeError(f"calib_config must be a CalibConfig, a dict or None, got {type(value).__name__}")


# ---- what is calibrated ----------------------------------------------------------------------------
def calibrated_config(cfg: ModelConfig, quant_config, kv_fp8: bool) -> ModelConfig:
    """A float checkpoint's config `cfg` as calibration makes it: quant_config's weight format, with
    static input scales (ModelConfig quant_algo "FP8") where quant_algo is FP8, and the K/V cache
    scales (kv_cache_scales) when the cache is fp8. Refuses a calib_config with nothing to calibrate."""
    out = cfg
    algo = quant_config.quant_algo if quant_config is not None else None
    if quant_config is not None and quant_config.weight_format is not None:
        out = quant_config.applied_to(cfg)
        if algo == QuantAlgo.FP8:
            out = dataclasses.replace(out, quant_algo="FP8")
    if kv_fp8:
        out = dataclasses.replace(out, kv_cache_scales=True)
    if out.quant_algo != "FP8" and not kv_fp8:
        raise ValueError(f"calib_config is given but nothing is calibrated (quant_algo="
                         f"{algo.value if algo is not None else None!r}, the KV cache not fp8); calibration measures "
                         "FP8's static scales: allowed: quant_config=QuantConfig(quant_algo='FP8') and/or "
                         "kv_cache_quant_algo='FP8' (or kv_cache_config.dtype='fp8'), or "
                         "calib_config=None")  # fmt: skip
    return out


def scale_paths(cfg: ModelConfig) -> list[str]:
    """The params a calibration of `cfg` (calibrated_config's) measures, in the checkpoint's layout."""
    paths = []
    for i in range(cfg.num_layers):
        if cfg.quant_algo == "FP8":
            paths += [f"layers.{i}.{name}{INPUT_SCALE_SUFFIX}" for name in QUANTIZED_PARAMS
                      if quantizes(f"layers.{i}.{name}", cfg)]  # fmt: skip
        if cfg.kv_cache_scales:
            paths += [f"layers.{i}.k_scale", f"layers.{i}.v_scale"]
    return paths


# ---- the dataset -----------------------------------------------------------------------------------
def _samples_of_record(record, where: str) -> str | list[int]:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        ids = record.get("input_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"calib_dataset {where}: 'input_ids' must be a list of token ids (ints)")
            return ids
        for name in TEXT_FIELDS:
            if isinstance(record.get(name), str):
                return record[name]
    raise ValueError(f"calib_dataset {where}: a sample is {str(record)[:80]!r}; allowed: a string, or an object "
                     f"with a text field ({', '.join(map(repr, TEXT_FIELDS))}) or 'input_ids'")  # fmt: skip


def _read_file(path: Path) -> list[str | list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"calib_dataset {path} is not UTF-8 text; allowed: text (each paragraph a sample), "
                         ".jsonl or .json samples") from None  # fmt: skip
    if path.suffix not in (".jsonl", ".json"):  # text, whatever its suffix (a licence's 'Apache-2.0')
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    if path.suffix == ".jsonl":
        lines = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [_samples_of_record(_json(line, where), where) for where, line in lines]
    data = _json(text, str(path))
    if not isinstance(data, list):
        raise ValueError(f"calib_dataset {path}: a .json file holds a list of samples, got {type(data).__name__}")
    return [_samples_of_record(record, f"{path}[{i}]") for i, record in enumerate(data)]


def _json(text: str, where: str):
    """The JSON value of `text`, or a ValueError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"calib_dataset {where} is not JSON ({e.msg}, column {e.colno})") from None


def read_samples(calib: CalibConfig) -> list[str | list[int]]:
    """The calibration samples (strings, or token ids) of `calib.calib_dataset`: all of them, or
    calib.num_samples of them drawn with calib.random_seed (kept in file order)."""
    path = Path(calib.calib_dataset).expanduser()
    allowed = ("allowed: the path of a local text file (paragraphs), a .jsonl or .json file of samples, or a "
               f"directory of {', '.join(SAMPLE_SUFFIXES)} files")  # fmt: skip
    if not path.exists():
        raise ValueError(f"CalibConfig.calib_dataset={calib.calib_dataset!r} is not a local file or directory "
                         f"(jaxllm downloads no datasets); {allowed}")  # fmt: skip
    files = sorted(p for p in path.iterdir() if p.suffix in SAMPLE_SUFFIXES) if path.is_dir() else [path]
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        raise ValueError(f"CalibConfig.calib_dataset={calib.calib_dataset!r} is a {path.suffix} table, which jaxllm "
                         f"does not read; {allowed}")  # fmt: skip
    samples = [s for f in files for s in _read_file(f) if len(s)]
    if not samples:
        raise ValueError(f"CalibConfig.calib_dataset={calib.calib_dataset!r} holds no samples; {allowed}")
    if len(samples) > calib.num_samples:
        keep = np.random.default_rng(calib.random_seed).choice(len(samples), calib.num_samples, replace=False)
        samples = [samples[i] for i in sorted(keep)]
    elif len(samples) < calib.num_samples:
        logger.info("calibration: %s holds %d samples, fewer than calib_batches x calib_batch_size = %d; all are used",
                    calib.calib_dataset, len(samples), calib.num_samples)  # fmt: skip
    return samples


def tokenize_samples(samples: list, tokenizer, max_length: int, vocab_size: int) -> list[list[int]]:
    """Each sample's token ids (text tokenized as a prompt is), cut at `max_length`."""
    out = []
    for sample in samples:
        if isinstance(sample, str):
            if tokenizer is None:
                raise ValueError("calib_dataset holds text, and this LLM has no tokenizer (skip_tokenizer_init=True); "
                                 "allowed: samples of token ids ({'input_ids': [...]}), or a tokenizer")  # fmt: skip
            sample = list(tokenizer.encode(sample))
        bad = [t for t in sample if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"calib_dataset: token id {bad[0]} is out of the vocabulary; allowed: 0 to "
                             f"{vocab_size - 1}")  # fmt: skip
        if sample:
            out.append(sample[:max_length])
    return out


def _batches(ids: list[list[int]], batch_size: int, max_length: int):
    """(tokens [B, L] int32, valid [B, L] bool) of each batch: right padding to a power of two."""
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        longest = max(len(r) for r in rows)
        length = min(max(MIN_PADDED_LENGTH, 1 << (longest - 1).bit_length()), max_length)
        tokens = np.zeros((batch_size, length), np.int32)
        valid = np.zeros((batch_size, length), bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row)], valid[i, : len(row)] = row, True
        yield tokens, valid


# ---- the measurement -------------------------------------------------------------------------------
def _masked_amax(t: jax.Array, valid: jax.Array) -> jax.Array:
    mask = valid.reshape(valid.shape + (1,) * (t.ndim - valid.ndim))
    return jnp.max(jnp.where(mask, jnp.abs(t.astype(jnp.float32)), 0.0))


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _observed_layer(lp: dict, x: jax.Array, valid: jax.Array, cfg: ModelConfig, layer: int):
    """One decoder layer over [B, L] rows -> (its output, {projection name / 'k' / 'v': amax})."""
    from jaxllm.models.transformer import dense_causal_attention, decoder_layer

    seen: dict[str, jax.Array] = {}

    def note(name, t):
        a = _masked_amax(t, valid)
        seen[name] = a if name not in seen else jnp.maximum(seen[name], a)

    def observe(name, h, y):  # the adapter hook: every projection's input
        note(name, h)
        return y

    def attend(q, k, v, layer):  # the rotated keys and the values, as the cache stores them
        note("k", k)
        note("v", v)
        return dense_causal_attention(q, k, v, scale=cfg.attn_scale, window=cfg.layer_window(layer), valid=valid)

    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return decoder_layer(lp, x, positions, layer, cfg, attend, observe), seen


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embedded(table: jax.Array, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    from jaxllm.models.transformer import embed

    return embed({"embed": table}, tokens, cfg, table.dtype)


def activation_amax(embed_table: jax.Array, layers: Iterable[dict], cfg: ModelConfig,
                    batches) -> list[dict[str, float]]:  # fmt: skip
    """Per layer {projection name: amax of its input, 'k' / 'v': of the rotated keys / the values}
    of a float model (`cfg` its float config; `layers` each layer's params in either layout, in
    order: an iterator may read each as it is asked for and drop the last) over `batches` of
    (tokens, valid). Every batch's hidden states are kept between layers, so one layer's weights are
    held at a time. Layers that differ only in their index share one program (their RoPE and window)."""
    first_of = {}
    for i in range(cfg.num_layers):
        first_of.setdefault((repr(cfg.layer_rope(i)), cfg.layer_window(i)), i)
    kinds = [first_of[(repr(cfg.layer_rope(i)), cfg.layer_window(i))] for i in range(cfg.num_layers)]
    batches = [(jnp.asarray(tokens), jnp.asarray(valid)) for tokens, valid in batches]
    hidden = [_embedded(embed_table, tokens, cfg) for tokens, _ in batches]
    totals: list[dict[str, jax.Array]] = [{} for _ in range(cfg.num_layers)]
    for i, lp in enumerate(layers):
        for b, (_, valid) in enumerate(batches):
            hidden[b], seen = _observed_layer(lp, hidden[b], valid, cfg, kinds[i])
            for name, a in seen.items():
                totals[i][name] = a if name not in totals[i] else jnp.maximum(totals[i][name], a)
    return [{name: float(a) for name, a in jax.device_get(t).items()} for t in totals]


def scales_from_amax(amax: list[dict[str, float]], cfg: ModelConfig) -> dict[str, float]:
    """{scale_paths(cfg) path: amax / 448} (1 for an input that was all zeros): the rule of
    `quantization.absmax_scale`, divided on the host (IEEE division): XLA divides by the constant
    through its reciprocal, an ulp off in about half the cases on the CPU, and an ulp moves which
    E4M3 value a bf16 ratio rounds to (agreement on real text moved by a position in 256)."""
    def scale(a: float) -> float:
        return a / FP8_MAX if a > 0 else 1.0

    out = {}
    for path in scale_paths(cfg):
        _, i, leaf = path.split(".")
        name = leaf.removesuffix(INPUT_SCALE_SUFFIX) if leaf.endswith(INPUT_SCALE_SUFFIX) else leaf[0]
        out[path] = scale(amax[int(i)][name])
    return out


def calibrate(resolved, cfg: ModelConfig, dtype, calib: CalibConfig, tokenizer, load_format: str = "auto",
              seed: int = 0, samples: list | None = None) -> dict[str, float]:  # fmt: skip
    """The calibrated scales (scale_paths(cfg) -> value) of checkpoint `resolved` under `cfg`
    (calibrated_config's), measured with its float weights in `dtype` on calib.device over
    `samples` (default: read_samples(calib)): the embedding, then one layer at a time, read from
    the checkpoint as it is needed (a model need not fit the device whole)."""
    from jaxllm.checkpoints import loader
    from jaxllm.quantization import base_config

    base = base_config(cfg)
    samples = read_samples(calib) if samples is None else samples
    ids = tokenize_samples(samples, tokenizer, calib.max_length, cfg.vocab_size)
    if not ids:
        raise ValueError(f"CalibConfig.calib_dataset={calib.calib_dataset!r}: no sample has a token")
    device = jax.local_devices(backend="cpu")[0] if calib.device == "cpu" else jax.local_devices()[0]

    def read(prefix: str) -> dict:  # the float params under `prefix` ("embed", "layers.3"), by their names in it
        flat = loader.read_float_params(resolved, base, dtype, lambda p: p == prefix or p.startswith(prefix + "."),
                                        load_format, seed)  # fmt: skip
        return {path.removeprefix(prefix + "."): array for path, array in flat.items()}

    def layers():
        for i in range(base.num_layers):
            lp = read(f"layers.{i}")
            yield lp
            for array in lp.values():
                array.delete()

    with jax.default_device(device):
        amax = activation_amax(read("embed")["embed"], layers(), base,
                               _batches(ids, calib.calib_batch_size, calib.max_length))  # fmt: skip
    logger.info("calibration: %d samples (%d tokens) on %s", len(ids), sum(map(len, ids)), device)
    return scales_from_amax(amax, cfg)
