"""GGUF files (llama.cpp's format): the file read, metadata mapped to a Hugging Face config, tensors dequantized.

The reader here parses the header (metadata key/values, tensor table) itself: `gguf.GGUFReader`
builds a Python object per metadata array element, which takes seconds on a 262k-token vocabulary.
Numeric arrays are read with numpy, string arrays with one tight loop, and tensor data is a view of
a memory map of the file. A parsed header is kept per (path, size, mtime) in a small in-process
cache, so the config, the weights and the tokenizer of one model share a single parse.

Metadata is mapped onto the same config.json keys transformers uses for GGUF, so a GGUF file and
its Hugging Face twin give the same `ModelConfig`. Tensors are dequantized with the `gguf` package
(numpy), one at a time, and put in Hugging Face layout: llama.cpp's q/k row interleave for "llama"
files is undone, Gemma norms are shifted back by one. Llama 3.1 files carry their RoPE scaling as
a `rope_freqs` tensor; it becomes the config's per-frequency factors.

An engine quantized to W4A16 with asymmetric groups of 32 (`QuantConfig(quant_algo='W4A16',
group_size=32, has_zero_point=True)`) reads the layer projections stored in 4-bit blocks (Q4_0,
Q4_1, Q4_K) as they are: each block's levels become int4 values and its scale and offset the
group's, never a float weight (`int_blocks`); under W8A16_GPTQ (int8 groups of 16 or 32) the 5- to
8-bit blocks (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) are kept the same way, as int8, and the 4-bit ones too.
Tensors of other types are dequantized and quantized to the engine's groups as they load, unless
`exclude_modules` leaves them in the model's dtype, as `blocks_quant_config` (the CLI's
`--quantization gguf`) does: the file's numbers as it stores them.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from jaxllm.checkpoints.names import CheckpointError, TensorMapper, gguf_names
from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.models import config_from_hf_dict, family_of
from jaxllm.models.params import flatten_paths, param_specs
from jaxllm.quantization import QUANTIZED_PARAMS, IntGroups, QuantConfig, group_of, quantizes

# Tensor types jaxllm loads (what gguf.quants.dequantize handles and llama.cpp writes for these models).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
)  # fmt: skip

# GGUF architecture -> Hugging Face model_type / architecture.
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# GGUF key (after "<arch>.") -> config.json key.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
# Where each architecture keeps its head size (transformers reads the same key).
_HEAD_DIM_KEY = {"llama": "rope.dimension_count", "qwen2": "attention.key_length",
                 "qwen3": "attention.key_length", "gemma3": "attention.key_length"}  # fmt: skip

# ---- the file format ------------------------------------------------------------------------------
# Layout (all little-endian): b"GGUF", u32 version, u64 tensor count, u64 key/value count, the
# key/values (string key, u32 value type, value), the tensor table (string name, u32 n_dims,
# u64 dims[n_dims] fastest-moving first, u32 ggml type, u64 offset into the data section), then the
# data section, which starts at the next multiple of `general.alignment` (32 when absent).
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 counted in 32 bits and predates every file jaxllm supports
_DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9  # the two variable-length value types
# Fixed-size value types (gguf.GGUFValueType numbering) -> struct format (standard sizes, little-endian).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}  # fmt: skip
_SCALAR = {kind: struct.Struct(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_VALUE_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Tensor types that gguf.GGUFReader (and so gguf.quants.dequantize) sees as typed elements; every
# other type is a uint8 array of [..., bytes per row] blocks.
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}  # fmt: skip
# Floats dequantized at a time (a slice of a tensor's rows): what bounds gguf's dequantize temporaries.
_DEQUANTIZE_ELEMENTS = 1 << 24
# Headers kept parsed: a few models' worth (one entry holds a vocabulary's strings, tens of MB at most).
_HEADER_CACHE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the table, its data a view of the file's memory map (nothing is read until used)."""

    name: str
    shape: tuple[int, ...]  # ggml order: fastest-moving dimension first, as the file stores it
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int
    file_map: np.ndarray = dataclasses.field(repr=False)  # uint8 memmap of the whole file

    @property
    def data(self) -> np.ndarray:
        """The stored elements as gguf.GGUFReader gives them (what gguf.quants.dequantize takes): typed
        [reversed shape] for float/int types, uint8 [..., bytes per row] for block-quantized ones."""
        raw = self.file_map[self.offset : self.offset + self.nbytes]
        rows = tuple(reversed(self.shape))
        dtype = _ELEMENT_DTYPES.get(self.tensor_type.name)
        if dtype is not None:
            return raw.view(dtype).reshape(rows)
        from gguf.quants import quant_shape_to_byte_shape

        return raw.reshape(quant_shape_to_byte_shape(rows, self.tensor_type))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """A parsed GGUF file: metadata (numeric arrays as numpy arrays, string arrays as lists) and tensors."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    alignment: int
    data_offset: int  # where the data section starts


class _HeaderParser:
    """Walks the header bytes of a mapped GGUF file; every read checks it stays inside the file."""

    def __init__(self, buffer: memoryview):
        self.buffer = buffer
        self.pos = 0

    def need(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.buffer):
            raise ValueError(f"the header runs past the end of the file (needs byte {self.pos + size}, "
                             f"the file has {len(self.buffer)})")  # fmt: skip

    def u32(self) -> int:
        self.need(4)
        (value,) = _U32.unpack_from(self.buffer, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        self.need(8)
        (value,) = _U64.unpack_from(self.buffer, self.pos)
        self.pos += 8
        return value

    def string(self) -> str:
        size = self.u64()
        self.need(size)
        text = str(self.buffer[self.pos : self.pos + size], "utf-8")
        self.pos += size
        return text

    def strings(self, count: int) -> list[str]:
        """`count` strings back to back (a vocabulary: 262144 for Gemma 3), read in one tight loop."""
        buffer, pos, end = self.buffer, self.pos, len(self.buffer)
        unpack_length = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (size,) = unpack_length(buffer, pos)
            pos += 8
            if pos + size > end:
                raise ValueError(f"string {len(out)} of an array runs past the end of the file")
            append(str(buffer[pos : pos + size], "utf-8"))
            pos += size
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        scalar = _SCALAR.get(kind)
        if scalar is not None:
            self.need(scalar.size)
            (value,) = scalar.unpack_from(self.buffer, self.pos)
            self.pos += scalar.size
            return value
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element_kind, count = self.u32(), self.u64()
            dtype = _VALUE_DTYPES.get(element_kind)
            if dtype is not None:
                self.need(count * dtype.itemsize)
                array = np.frombuffer(self.buffer, dtype, count, self.pos).copy()
                self.pos += count * dtype.itemsize
                return array
            if element_kind == _STRING:
                self.need(count * 8)  # each string has at least its length
                return self.strings(count)
            if element_kind == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise ValueError(f"array element type {element_kind} is not a GGUF value type (0-12)")
        raise ValueError(f"value type {kind} is not a GGUF value type (0-12)")


def _parse_header(path: Path) -> GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    file_map = np.memmap(path, dtype=np.uint8, mode="r")
    reader = _HeaderParser(memoryview(file_map))
    reader.need(4)
    magic = bytes(reader.buffer[:4])
    if magic != _MAGIC:
        raise ValueError(f"it starts with {magic!r}, not the GGUF magic {_MAGIC!r}")
    reader.pos = 4
    version = reader.u32()
    if version not in _VERSIONS:
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in _VERSIONS:
            raise ValueError("it is a big-endian GGUF file; jaxllm reads little-endian ones")
        raise ValueError(f"GGUF version {version} is not supported; supported: {', '.join(map(str, _VERSIONS))}")
    tensor_count, kv_count = reader.u64(), reader.u64()
    # Each key/value takes >= 12 bytes and each tensor entry >= 24: counts beyond that are damage.
    if kv_count * 12 + tensor_count * 24 > len(reader.buffer):
        raise ValueError(f"its counts ({tensor_count} tensors, {kv_count} key/values) exceed what the file can hold")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.u32())
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment={alignment!r} is invalid; allowed: a power of two")
    entries = []
    for _ in range(tensor_count):
        name = reader.string()
        num_dims = reader.u32()
        reader.need(8 * num_dims)
        shape = tuple(int(d) for d in np.frombuffer(reader.buffer, "<u8", num_dims, reader.pos))
        reader.pos += 8 * num_dims
        kind, offset = reader.u32(), reader.u64()
        entries.append((name, shape, kind, offset))
    data_offset = -(-reader.pos // alignment) * alignment
    tensors, names = [], set()
    for name, shape, kind, offset in entries:
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice in the tensor table")
        names.add(name)
        try:
            tensor_type = GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"tensor {name!r} has ggml type {kind}, which the gguf package does not know") from None
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if shape and shape[0] % block_size:
            raise ValueError(f"tensor {name!r} has {shape[0]} elements per row, not a multiple of "
                             f"{tensor_type.name}'s block of {block_size}")  # fmt: skip
        nbytes = elements // block_size * type_size
        start = data_offset + offset
        if start + nbytes > len(reader.buffer):
            raise ValueError(f"tensor {name!r} (bytes {start}..{start + nbytes}) runs past the end of the file "
                             f"({len(reader.buffer)} bytes): truncated?")  # fmt: skip
        tensors.append(GGUFTensor(name, shape, tensor_type, start, nbytes, file_map))
    return GGUFHeader(path, version, metadata, tuple(tensors), alignment, data_offset)


@functools.lru_cache(maxsize=_HEADER_CACHE_SIZE)
def _cached_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    try:
        return _parse_header(Path(path))
    except (ValueError, struct.error) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _open(path: Path) -> GGUFHeader:
    """The parsed header of a GGUF file, parsed once per (path, size, mtime) in this process.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is not a readable GGUF file (the message names it and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _cached_header(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_metadata(path: Path) -> dict:
    """All key/value metadata of a GGUF file (tokenizer arrays included; numeric arrays as numpy arrays).

    The dictionary is the cached header's own: treat it as read-only.
    """
    return _open(path).metadata


def hf_model_type(metadata: dict) -> tuple[str, str] | None:
    """(Hugging Face model_type, architecture class) of a GGUF file's metadata, None for an unknown architecture."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        return None
    if arch == "llama" and "mistral" in str(metadata.get("general.name") or "").lower():
        return "mistral", "MistralForCausalLM"  # llama.cpp writes Mistral as "llama"
    return GGUF_ARCHITECTURES[arch]


def hf_config_dict(path: Path, header: GGUFHeader | None = None) -> dict:
    """A config.json dictionary equivalent to the GGUF metadata."""
    header = header or _open(path)
    metadata = header.metadata
    arch = metadata.get("general.architecture")
    model = hf_model_type(metadata)
    if model is None:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    model_type, architecture = model
    config: dict = {"model_type": model_type, "architectures": [architecture]}
    for key, hf_key in _CONFIG_KEYS.items():
        value = metadata.get(f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    head_dim = metadata.get(f"{arch}.{_HEAD_DIM_KEY[arch]}")
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    if arch == "gemma3":
        # GGUF has no query_pre_attn_scalar; llama.cpp scales by head_dim, except for the 27B
        # model (62 layers), which uses hidden_size / num_heads, as its config.json does.
        heads = config["num_attention_heads"]
        scalar = config["hidden_size"] // heads if config.get("num_hidden_layers") == 62 else config["head_dim"]
        config["query_pre_attn_scalar"] = scalar
    if "vocab_size" not in config:
        tokens = metadata.get("tokenizer.ggml.tokens")
        config["vocab_size"] = len(tokens) if tokens is not None else None
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in header.tensors)
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):  # fmt: skip
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    types = {t.tensor_type.name for t in header.tensors}
    config["torch_dtype"] = "bfloat16" if types <= {"BF16", "F32"} and "BF16" in types else (
        "float16" if types <= {"F16", "F32"} and "F16" in types else "float32")  # fmt: skip
    return config


def read_config(path: Path) -> ModelConfig:
    header = _open(path)
    cfg = config_from_hf_dict(hf_config_dict(path, header))
    freqs = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        factors = tuple(float(f) for f in np.asarray(_dequantize(freqs), np.float32).reshape(-1))
        rope = RopeConfig(**{**cfg.rope.__dict__, "freq_factors": factors})
        cfg = ModelConfig(**{**cfg.__dict__, "rope": rope})
    return cfg


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array in row-major (Hugging Face) layout."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"GGUF tensor {tensor.name!r} has type {kind}, which jaxllm does not load; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(reversed(tensor.shape))
    if len(shape) < 2:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    out = np.empty(shape, np.float32)
    for rows, floats in _float_slices(tensor):
        out[rows] = floats
    return out


def _float_slices(tensor: GGUFTensor) -> Iterator[tuple[slice, np.ndarray]]:
    """A tensor of two or more axes dequantized in slices of rows: (the rows, their floats). gguf's
    dequantize makes float temporaries the size of its result (a 262k-token Q8_0 embedding peaked
    at 2.3x its 671 MB of floats whole); a slice bounds them."""
    from gguf.quants import dequantize

    data = tensor.data
    step = max(1, _DEQUANTIZE_ELEMENTS // max(1, int(np.prod(tensor.shape[:-1], dtype=np.int64))))
    for start in range(0, data.shape[0], step):
        yield slice(start, start + step), dequantize(data[start : start + step], tensor.tensor_type)


# Block types whose blocks are weight-only groups as they are, w = d * level + m along a row: the
# values a group spans (a K-quant's sub-block), and the engine formats that hold their levels.
# 4-bit: Q4_0 (m = -8 d), Q4_1 (d, m per block), Q4_K (d * sub-scale, -dmin * sub-min per 32);
# 5-bit: Q5_0 (m = -16 d), Q5_1, Q5_K (as Q4_K); 6-bit: Q6_K (d * an int8 sub-scale per 16, m = -32
# times that); 8-bit: Q8_0 (d, signed levels). W4A16 holds the 4-bit ones, W8A16 (int8) all of them.
BLOCK_GROUP = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 32, "Q5_0": 32, "Q5_1": 32, "Q5_K": 32, "Q6_K": 16, "Q8_0": 32}
INT4_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FORMAT_BLOCK_TYPES = {"W4A16": INT4_BLOCK_TYPES, "W8A16": tuple(BLOCK_GROUP)}
# Types whose offsets are a fixed multiple of the scale: their centred levels need no offset.
SYMMETRIC_BLOCK_TYPES = ("Q4_0", "Q5_0", "Q6_K", "Q8_0")
INT4_BLOCK = 32  # values per group of the 4-bit types


def kept_group(kind: str, input_extent: int, cfg: ModelConfig) -> int:
    """The group (input channels a scale covers) in which a projection stored as `kind` is read as
    its blocks under cfg (the engine's config), or 0 when it is not: a grouped weight-only format
    that holds `kind`'s levels, whose groups along the projection's last input axis (of
    `input_extent`) divide the file's (each block's scale then serves its groups), with offsets
    unless the blocks need none."""
    if cfg.quant_algo not in FORMAT_BLOCK_TYPES or kind not in FORMAT_BLOCK_TYPES[cfg.quant_algo] or not cfg.quant_group_size:
        return 0
    group = group_of(input_extent, cfg.quant_group_size)
    symmetric_ok = cfg.quant_zero_point or kind in SYMMETRIC_BLOCK_TYPES
    return group if BLOCK_GROUP[kind] % group == 0 and symmetric_ok else 0


def _kept_blocks(cfg: ModelConfig, quantized: ModelConfig) -> Callable[[str, str], int]:
    """(param path, GGUF tensor type) -> the group in which that tensor is read as its blocks under
    the engine's config `quantized`, or 0: a projection it quantizes whose blocks serve its groups
    (`kept_group`)."""
    specs = flatten_paths(param_specs(cfg))

    def kept(param: str, kind: str) -> int:
        if not quantizes(param, quantized):  # not a quantized layer projection (the LM head, a norm, excluded)
            return 0
        last_input_axis = QUANTIZED_PARAMS[param.rsplit(".", 1)[-1]] - 1
        return kept_group(kind, specs[param].shape[last_input_axis], quantized)

    return kept


def blocks_quant_config(path: Path) -> dict:
    """QuantConfig's fields that serve a GGUF file's numbers as it stores them (the CLI's
    `--quantization gguf`), the projections' blocks read as they are (`kept_group`):

    - at least as many of the projections' weights in 4-bit blocks as in 5- to 8-bit ones: W4A16
      in asymmetric groups of 32, every projection of another type (Q5_K, Q6_K, Q8_0, F16, ...)
      excluded (`exclude_modules`: dequantized to the model's dtype, not quantized again);
    - otherwise W8A16_GPTQ, int8 in groups of 16 when a projection is Q6_K (else 32), asymmetric
      when a type needs offsets: every projection in blocks kept, those in float types excluded.
    """
    from jaxllm.checkpoints.names import hf_module_name

    cfg = read_config(path)
    params = {name: param for name, (param, _) in gguf_names(cfg, family_of(cfg.architecture)).items()}
    int4_fields = {"quant_algo": "W4A16", "group_size": INT4_BLOCK, "has_zero_point": True}
    probe = QuantConfig(**int4_fields).applied_to(cfg)
    projections = [(params[t.name], t.tensor_type.name, int(np.prod(t.shape))) for t in _open(path).tensors
                   if quantizes(params.get(t.name, ""), probe)]  # fmt: skip
    four_bit = sum(n for _, kind, n in projections if kind in INT4_BLOCK_TYPES)
    wider = sum(n for _, kind, n in projections if kind in BLOCK_GROUP and kind not in INT4_BLOCK_TYPES)
    if four_bit >= wider:
        fields = int4_fields
    else:
        kinds = {kind for _, kind, _ in projections if kind in BLOCK_GROUP}
        group = min((BLOCK_GROUP[k] for k in kinds), default=INT4_BLOCK)
        zero_point = bool(kinds - set(SYMMETRIC_BLOCK_TYPES))
        fields = {"quant_algo": "W8A16_GPTQ", "group_size": group, "has_zero_point": zero_point}
    kept = _kept_blocks(cfg, QuantConfig(**fields).applied_to(cfg))
    excluded = [hf_module_name(param) for param, kind, _ in projections if not kept(param, kind)]
    return fields | {"exclude_modules": excluded or None}


def _f16(column: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32 (a block's float16 field)."""
    return np.ascontiguousarray(column).view(np.float16)[..., 0].astype(np.float32)


def _k_scale_offset(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks [rows, n, bytes] (d, dmin, 8 packed 6-bit (scale, min) pairs first)
    -> each group of 32's scale d * sub-scale and offset -dmin * sub-min, [rows, n * 8]."""
    from gguf.quants import Q4_K

    rows = blocks.shape[0]
    d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
    sub_scale, sub_min = (x.reshape(rows, -1, 8) for x in Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12)))
    return (d * sub_scale).reshape(rows, -1), -(dmin * sub_min).reshape(rows, -1)


def int_blocks(tensor: GGUFTensor, group: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tensor's blocks (a type of BLOCK_GROUP), not dequantized: (q int8 [rows, cols], scale and
    zero float32 [rows, cols / group]) with w = q * scale + zero per group of `group` values along a
    row (default: the type's own; a smaller one that divides it repeats each block's scale and
    zero), the numbers gguf.quants.dequantize computes (to float32 rounding). q is the level centred
    on zero: in [-8, 7] for the 4-bit types, [-16, 15] for the 5-bit, [-32, 31] for Q6_K, Q8_0's own."""
    data, kind = tensor.data, tensor.tensor_type.name
    if kind not in BLOCK_GROUP:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {kind}; blocks are read for {', '.join(BLOCK_GROUP)}")
    rows = data.shape[0]
    if kind in INT4_BLOCK_TYPES:  # the levels unpacked from their nibbles
        if kind == "Q4_K":  # super-blocks of 256: d, dmin, 8 packed 6-bit (scale, min) pairs, 128 bytes of levels
            blocks = data.reshape(rows, -1, 144)
            scale, offset = _k_scale_offset(blocks)
            qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # 4 x 32 bytes: low nibbles group 2j, high 2j + 1
            levels = qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        else:  # Q4_0 / Q4_1, blocks of 32: d (and m), 16 bytes of levels, low nibbles first
            blocks = data.reshape(rows, -1, 18 if kind == "Q4_0" else 20)
            scale = _f16(blocks[..., 0:2])
            offset = -8.0 * scale if kind == "Q4_0" else _f16(blocks[..., 2:4])
            levels = blocks[..., None, -16:] >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (levels & np.uint8(0x0F)).reshape(rows, -1).astype(np.int8) - np.int8(8)
        zero = (offset + np.float32(8.0) * scale).astype(np.float32)  # w = d * level + m = d * (level - 8) + (m + 8 d)
    else:  # the levels recovered from the file's floats, given each group's scale and offset
        size = {"Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q5_K": 176, "Q6_K": 210}[kind]
        blocks = data.reshape(rows, -1, size)
        if kind == "Q5_K":  # as Q4_K, and 32 bytes of fifth bits
            scale, offset = _k_scale_offset(blocks)
        elif kind == "Q6_K":  # 128 bytes of low nibbles, 64 of high pairs, 16 int8 sub-scales, d
            d = _f16(blocks[..., 208:210])[..., None]
            scale = (d * blocks[..., 192:208].view(np.int8).astype(np.float32)).reshape(rows, -1)
            offset = np.zeros_like(scale)
        else:  # Q5_0 / Q5_1 / Q8_0, blocks of 32: d (and Q5_1's m)
            scale = _f16(blocks[..., 0:2])
            offset = _f16(blocks[..., 2:4]) if kind == "Q5_1" else np.zeros_like(scale)
        center = {"Q5_0": 0, "Q5_1": 16, "Q5_K": 16, "Q6_K": 0, "Q8_0": 0}[kind]  # w = d * (level - center) + (m + center d)
        safe = np.where(scale == 0, np.float32(1), scale)[..., None]
        q = np.empty((rows, scale.shape[1] * BLOCK_GROUP[kind]), np.int8)
        for part, floats in _float_slices(tensor):  # float temporaries of a slice of rows
            w = floats.reshape(-1, scale.shape[1], BLOCK_GROUP[kind])
            levels = np.rint((w - offset[part, :, None]) / safe[part]) - center
            q[part] = np.where(scale[part, :, None] == 0, 0, levels).reshape(len(w), -1)
        zero = (offset + np.float32(center) * scale).astype(np.float32)
    native = BLOCK_GROUP[kind]
    group = group or native
    if native % group:
        raise ValueError(f"GGUF tensor {tensor.name!r}: groups of {group} do not divide {kind}'s blocks of {native}")
    repeat = native // group
    return q, np.repeat(scale.astype(np.float32), repeat, axis=-1), np.repeat(zero, repeat, axis=-1)


def _unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of q/k rows ([heads * hd, D])."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_file_tensors(path: Path, cfg: ModelConfig, blocks: Callable[[GGUFTensor], int] | None = None,
                           wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Any]]:  # fmt: skip
    """Yield (GGUF tensor name, float32 array in Hugging Face layout), metadata-only tensors skipped;
    a tensor for which `blocks` gives a group comes as its blocks instead, (q, scale, zero) of
    `int_blocks` in that group. With `wanted` (a predicate on tensor names), only those are read."""
    family = family_of(cfg.architecture)
    for tensor in _open(path).tensors:
        if tensor.name == "rope_freqs.weight" or (wanted is not None and not wanted(tensor.name)):
            continue  # (rope_freqs: folded into the config, read_config)
        group = blocks(tensor) if blocks is not None else 0
        arrays = int_blocks(tensor, group) if group else (_dequantize(tensor),)
        if family.gguf_permuted_qk and tensor.name.endswith("attn_q.weight"):  # rows permuted: each group with its row
            arrays = tuple(_unpermute_qk(a, cfg.num_heads) for a in arrays)
        elif family.gguf_permuted_qk and tensor.name.endswith("attn_k.weight"):
            arrays = tuple(_unpermute_qk(a, cfg.num_kv_heads) for a in arrays)
        if family.gguf_norm_plus_one and tensor.name.endswith("norm.weight"):
            arrays = (arrays[0] - 1.0,)
        yield tensor.name, arrays if len(arrays) > 1 else arrays[0]


def load_gguf_tensors(path: Path, cfg: ModelConfig, quantized: ModelConfig | None = None,
                      only=None) -> Iterator[tuple[str, Any]]:  # fmt: skip
    """Yield (param path, array in params layout) for every parameter, checking the whole set.

    quantized: the engine's config; under a grouped weight-only format a layer projection whose
    blocks serve its groups (`kept_group`) comes as its groups as they are, an `IntGroups`, instead
    of floats.
    only: a predicate on param paths: those alone are read (no others dequantized), nothing missing
    checked."""
    mapper = TensorMapper(cfg, gguf_names(cfg, family_of(cfg.architecture)), str(path), only=only)
    kept = _kept_blocks(cfg, quantized) if quantized is not None else None

    def blocks(tensor: GGUFTensor) -> int:
        if kept is None or tensor.name not in mapper.names:
            return 0
        return kept(mapper.names[tensor.name][0], tensor.tensor_type.name)

    for name, array in iter_gguf_file_tensors(path, cfg, blocks, mapper.selects):
        if not mapper.wants(name):
            continue
        if isinstance(array, tuple):  # (q, scale, zero) in the file's [out, in] rows, laid out like the weight
            param, q = mapper.convert(name, array[0])
            yield param, IntGroups(q, *(mapper.transform(name, a) for a in array[1:]))
        else:
            yield mapper.convert(name, array)
    mapper.finish()
