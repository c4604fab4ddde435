"""Shape buckets: the padded sizes a step can take, and the key of every compiled program.

An engine runs four kinds of programs, each compiled once per key and all of them before `LLM()`
returns (engine/executables.py), so serving never waits for a compilation:

  ForwardShape   the model over one ragged step (or, with decode_steps = K > 1, K decodes in one
                 program, sampling included): T packed tokens of B sequence slots, block tables of
                 P pages, at most Q tokens a sequence; its `sampling` flavor only for K > 1.
  SamplerShape   sampling from a step's last-token logits: B rows, in one of three flavors.
  HeadShape      the LM head over every token of a step (prompt log-probabilities, and the
                 logits themselves for context logits): T tokens.

Bucket lists (`Buckets`), chosen so that the whole set stays small (tens of programs):
  decode-only steps: B = T, powers of two up to max_batch_size, from GPU_MIN_DECODE_ROWS on GPUs;
  mixed steps:       T, powers of two up to max_num_tokens, B = min(T, max_batch_size) (a mixed
                     step's cost is mostly its tokens; from FEW_SEQS_MIN_TOKENS tokens also
                     B = FEW_SEQS, so a few long prompts do not pay for thousands of rows of
                     logits), Q = T (the kernels take the real query lengths as data: the ragged
                     kernel's work list, the XLA path's masks);
                     with the 'xla' backend a decode-only step of B sequences is the mixed bucket
                     T = B, so both kinds share programs;
  block tables:      P, one bucket up to MIN_PAGE_BUCKET pages, powers of two above (attention
                     stops at each sequence's real length, so P only sizes the tables);
  multi-step decodes: B as decode-only steps, up to `multi_step_max_rows` (MULTI_STEP_FULL_MAX_ROWS
                     for the "full" flavor on GPUs).

Sampling flavors (what varies between requests is data, not a compiled switch):
  "plain"      greedy or temperature sampling, with the chosen token's log-probability and rank;
  "full"       also top-k / top-p / min-p truncation, the top MAX_LOGPROBS log-probabilities,
               embedding bias (a device table of bias rows, one slot a distinct bias) and banned
               tokens (a fixed-width list a row);
  "penalties"  "full" plus repetition / presence / frequency penalties, read from the tokens the
               device keeps beside the KV cache (so no per-request width).
A batch takes the cheapest flavor that serves every row.

Each program is compiled with its own XLA options (`compiler_options`).
"""

from __future__ import annotations

import dataclasses

# Block tables are padded to at least this many pages: attention loops stop at the real lengths, so
# a wider table costs only its host-to-device copy, and fewer widths mean fewer programs.
MIN_PAGE_BUCKET = 1024

# The smallest decode bucket on GPUs. With one row, XLA's GPU simplifier rewrites a product whose
# weight holds under 10M elements (K and V at any TP; every projection's per-GPU share at TP >= 2)
# into a multiply and a reduction, which streams the weight several times slower than a GEMM; with
# two rows each stays a GEMM. A batch-1 decode step therefore runs two rows there, the second an idle
# slot like any bucket's padding (benchmarks/archive/RESULTS-2026-11.md, "two rows").
GPU_MIN_DECODE_ROWS = 2

# The smallest mixed-step token bucket of the Pallas backend (its ragged kernel's tiles are 16 rows).
PALLAS_MIN_MIXED_TOKENS = 16

# On the CPU a multi-step decode pays only up to this many rows: the host's work per step (~5-20 ms
# for SmolLM2 on 2 cores) is a large share of a small batch's step and a small share of a wide one's
# (measured: +11% tokens/s at batch 1, +25% at batch 16), and every bucket is two more programs.
CPU_MULTI_STEP_MAX_ROWS = 16

# A multi-step decode of a few rows under tensor parallelism on GPUs is bound by the host launching it:
# XLA splits each step into ~65 CUDA graphs at the all-reduces and the host takes ~65 us per all-reduce
# to launch the collective and the next graph, 4.2 ms a step against 3.1 ms of GPU work (Llama-3.1-8B
# shape, TP=2, 2 x H200). Compiled with these options the whole dispatch is one CUDA graph: all-reduces
# synchronous on the compute stream and recorded into it, the decode loop a conditional node
# (benchmarks/archive/RESULTS-2026-11.md, "one CUDA graph"). Not for single-step decodes or TP=1,
# which they slow down.
ONE_GRAPH_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,
    "xla_gpu_disable_async_collectives": "ALLREDUCE",
    "xla_gpu_experimental_use_collective_kernels": "",  # NCCL's all-reduce, which command buffers can record
}
ONE_GRAPH_MAX_ROWS = 2  # the batch sizes it was measured at (batch 1 runs the two-row bucket)

# XLA's GPU compiler autotunes a Triton GEMM beside cuBLAS's for every product, and that autotuning
# is most of a program's compile time and does not run in parallel: the Llama-3.1-8B shape's 84
# programs took 95 s on 16 threads with it and 43 s without (H200). Triton's GEMMs win only at a few
# rows: a 2-row decode step 6.0 ms with them against 7.5 ms without; at 64 rows and up cuBLAS's are
# as fast or faster (decode 7.7 vs 7.9 ms at 64 rows, 9.6 vs 10.9 at 256; mixed 7.1 vs 8.4 ms at 64
# tokens, 23.1 vs 24.8 at 1,024: benchmarks/RESULTS.md, "First contact"). So on GPUs only forward
# programs of at most TRITON_GEMM_MAX_ROWS tokens keep them.
NO_TRITON_GEMM_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
TRITON_GEMM_MAX_ROWS = 8
# A quantized model's decode-sized products are weight-only (layers/linear.py `project`'s
# weight_only_rows: the fp8 or int weight widened to bf16 inside the product). Triton's GEMM fusion
# widens it in the GEMM's prologue and reads the quantized bytes; cuBLAS takes no fp8 or int operand
# beside a bf16 one, so without Triton XLA first writes a widened copy of the weight. A quantized
# model's forward programs therefore keep Triton GEMMs up to this many tokens (its weight-only rows,
# linear.WEIGHT_ONLY_MAX_ROWS): a 16-row decode step of the Llama-3.1-8B shape took 15.1 -> 4.0 ms
# in FP8 and W8A16 and 17.4 -> 5.7 ms in W4A16 (H100; benchmarks/RESULTS.md, "Quantized models'
# 16-row steps keep Triton GEMMs").
QUANTIZED_TRITON_GEMM_MAX_ROWS = 16

# A mixed step's sequence slots are B = min(T, max_batch_size), and every slot's last token goes
# through the LM head and the sampler. With TensorRT-LLM's max_batch_size of 2048 a lone 2,048-token
# prompt (T = 2048) paid for 2,048 rows of logits. So a mixed token bucket of at least
# FEW_SEQS_MIN_TOKENS whose full width is wider than FEW_SEQS also has a program of B = FEW_SEQS, for
# steps of that many sequences or fewer (a long prompt, or the first prompts of a batch): time to
# first token of a 2,048-token prompt 61.1 -> 55.1 ms, 4 more programs (H200, Llama-3.1-8B shape;
# benchmarks/RESULTS.md, "The ShareGPT-like mix at TensorRT-LLM's max_batch_size").
FEW_SEQS = 256
FEW_SEQS_MIN_TOKENS = 1024

SAMPLING_FLAVORS = ("plain", "full", "penalties")
# A multi-step decode serves no bias, bans or penalties. On the CPU only "plain" ones are compiled:
# each flavor is another program per bucket, and "full" ones (truncating rows) gained 0-7% at 1-8
# rows of top_p 0.9 for 15 s more of compiling in an empty cache's LLM() (64 against 50 s;
# SmolLM2-135M, benchmarks/RESULTS.md, "Top-p without a sort").
MULTI_STEP_FLAVORS = ("plain", "full")
CPU_MULTI_STEP_FLAVORS = ("plain",)
# On GPUs "full" multi-step decodes are compiled up to this many rows (wider batches that truncate
# run single-step decodes): each is another forward-sized program (~1/30 of an empty-cache start-up
# on the H200), while the host round trip a multi-step decode saves is a shrinking share of a wide
# step, whose truncation passes over every row's vocabulary 30 times at every decode.
MULTI_STEP_FULL_MAX_ROWS = 64


def powers_of_two(low: int, high: int) -> list[int]:
    """[low, 2*low, ..., high] with `high` itself as the last bucket."""
    buckets, b = [], low
    while b < high:
        buckets.append(b)
        b *= 2
    buckets.append(high)
    return buckets


def decode_buckets(min_rows: int, max_batch_size: int, batch_sizes: tuple[int, ...] | None = None) -> list[int]:
    """The decode-only steps' sequence buckets: powers of two from `min_rows` (GPU_MIN_DECODE_ROWS on
    GPUs, else 1) up to max_batch_size, and `min_rows` alone when max_batch_size is smaller. With
    `batch_sizes` (a CudaGraphConfig's), those sizes (at least `min_rows`, at most max_batch_size)
    up to the largest, then powers of two on from it up to max_batch_size."""
    top = max(min_rows, max_batch_size)
    if not batch_sizes:
        return powers_of_two(min_rows, top)
    chosen = sorted({min(max(b, min_rows), top) for b in batch_sizes})
    return chosen[:-1] + powers_of_two(chosen[-1], top)


def bucket_for(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class ForwardShape:
    """The key of a forward program (and of a multi-step decode, which samples inside)."""

    num_tokens: int  # T
    num_seqs: int  # B
    pages_per_seq: int  # P
    max_query_len: int  # Q: 1 for a decode-only step, T for a mixed one
    adapters: bool = False  # reads the adapter bank (some token has a LoRA adapter or is virtual)
    decode_steps: int = 1  # > 1: a decode-only step that runs this many decodes in one dispatch
    sampling: str = ""  # a multi-step decode's flavor (MULTI_STEP_FLAVORS); "" for one step

    kind = "forward"

    def to_json(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """The key of a sampling program: B rows of last-token logits in one flavor (SAMPLING_FLAVORS);
    P, the block-table width it reads the tokens of the sequences through, only for "penalties"."""

    num_seqs: int
    flavor: str = "plain"
    pages_per_seq: int = 0
    guided: bool = False  # also reads each row's token bitmask (guided decoding, jaxllm/guided.py)

    kind = "sampler"

    def to_json(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """The key of an LM-head program over all T tokens of a step: prompt log-probabilities, and the
    [T, V] logits themselves with `all_logits` (context logits)."""

    num_tokens: int
    all_logits: bool = False

    kind = "head"

    def to_json(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


SHAPE_KINDS = {cls.kind: cls for cls in (ForwardShape, SamplerShape, HeadShape)}


def shape_from_json(data: dict):
    data = dict(data)
    return SHAPE_KINDS[data.pop("kind")](**data)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The bucket lists of one engine and every program key it can ask for.

    Args:
      max_num_tokens, max_batch_size, max_seq_len, page_size: the engine's limits.
      backend: 'xla' (decode-only steps share the mixed programs) or 'pallas' (they have their own:
        the decode kernel).
      min_decode_rows: the smallest decode bucket (GPU_MIN_DECODE_ROWS on GPUs, else 1).
      decode_steps: K of the multi-step decode programs (1: none).
      multi_step_max_rows: the widest multi-step decode bucket.
      multi_step_flavors: the sampling flavors multi-step decodes are compiled for.
      multi_step_full_max_rows: the widest "full" multi-step decode (None: multi_step_max_rows).
      adapters: whether the engine serves adapters (every forward program has an adapters twin).
      decode_batch_sizes: the decode buckets up to their largest (a CudaGraphConfig's batch_sizes;
        None: powers of two); with 'xla' they join the mixed steps' token buckets.
    """

    max_num_tokens: int
    max_batch_size: int
    max_seq_len: int
    page_size: int
    backend: str = "xla"
    min_decode_rows: int = 1
    decode_steps: int = 1
    multi_step_max_rows: int | None = None
    multi_step_flavors: tuple[str, ...] = MULTI_STEP_FLAVORS
    multi_step_full_max_rows: int | None = None
    adapters: bool = False
    decode_batch_sizes: tuple[int, ...] | None = None
    guided: bool = False  # every sampler program has a guided twin (LLM(guided_decoding_backend=...))

    @property
    def seq_buckets(self) -> list[int]:
        return decode_buckets(self.min_decode_rows, self.max_batch_size, self.decode_batch_sizes)

    @property
    def token_buckets(self) -> list[int]:
        """Mixed steps' token buckets (with 'xla', decode-only steps' too)."""
        low = self.min_decode_rows if self.backend == "xla" else PALLAS_MIN_MIXED_TOKENS
        buckets = powers_of_two(min(low, self.max_num_tokens), self.max_num_tokens)
        if self.backend == "xla" and self.decode_batch_sizes:
            buckets = sorted(set(buckets) | {b for b in self.seq_buckets if b <= self.max_num_tokens})
        return buckets

    @property
    def page_buckets(self) -> list[int]:
        max_pages = -(-self.max_seq_len // self.page_size)
        return powers_of_two(min(max_pages, MIN_PAGE_BUCKET), max_pages)

    @property
    def multi_step_buckets(self) -> list[int]:
        if self.decode_steps <= 1:
            return []
        cap = self.multi_step_max_rows or self.max_batch_size
        return [b for b in self.seq_buckets if b <= max(cap, self.seq_buckets[0])]

    def multi_step_rows(self, flavor: str) -> list[int]:
        """The multi-step decode buckets compiled in `flavor` (none if it is not compiled)."""
        if flavor not in self.multi_step_flavors:
            return []
        cap = self.multi_step_full_max_rows if flavor == "full" else None
        return [b for b in self.multi_step_buckets if cap is None or b <= max(cap, self.seq_buckets[0])]

    def mixed_seqs(self, num_tokens: int) -> int:
        """The full width B of the mixed token bucket T = `num_tokens`."""
        return min(num_tokens, self.max_batch_size)

    def mixed_seq_buckets(self, num_tokens: int) -> list[int]:
        """The widths B the mixed token bucket T = `num_tokens` is compiled at: its full width, and
        FEW_SEQS below it for T >= FEW_SEQS_MIN_TOKENS."""
        full = self.mixed_seqs(num_tokens)
        return [FEW_SEQS, full] if num_tokens >= FEW_SEQS_MIN_TOKENS and FEW_SEQS < full else [full]

    @property
    def sampler_rows(self) -> list[int]:
        """Every B a forward program produces logits for."""
        rows = {b for t in self.token_buckets for b in self.mixed_seq_buckets(t)}
        if self.backend != "xla":
            rows |= set(self.seq_buckets)
        return sorted(rows)

    @property
    def max_rows(self) -> int:
        """The most rows (sequences) any program samples: the width of the sampled-token array a
        step scheduled ahead reads its input tokens from (programs.merge_tokens)."""
        return max([*self.sampler_rows, *self.seq_buckets, *self.multi_step_buckets])

    # ---- the key of one step -------------------------------------------------------------------
    def forward_shape(self, token_counts: list[int], pages: int, adapters: bool = False,
                      decode_steps: int = 1, sampling: str = "") -> ForwardShape:  # fmt: skip
        """The bucket of a step whose sequences compute `token_counts` tokens, with block tables of
        `pages` pages at most."""
        P = bucket_for(pages, self.page_buckets)
        decode_only = max(token_counts) == 1
        if decode_steps > 1:
            B = bucket_for(len(token_counts), self.multi_step_rows(sampling))
            return ForwardShape(B, B, P, 1, adapters, decode_steps, sampling)
        if decode_only and self.backend != "xla":
            B = bucket_for(len(token_counts), self.seq_buckets)
            return ForwardShape(B, B, P, 1, adapters)
        T = bucket_for(max(sum(token_counts), len(token_counts)), self.token_buckets)
        return ForwardShape(T, bucket_for(len(token_counts), self.mixed_seq_buckets(T)), P, T, adapters)

    def sampler_shape(self, num_seqs: int, flavor: str, pages: int = 0, guided: bool = False) -> SamplerShape:
        B = bucket_for(num_seqs, self.sampler_rows)
        P = bucket_for(pages, self.page_buckets) if flavor == "penalties" else 0
        return SamplerShape(B, flavor, P, guided)

    # ---- every program ---------------------------------------------------------------------------
    def all_shapes(self) -> list:
        """Every program key this engine can ask for, cheapest first within each kind."""
        shapes: list = []
        adapter_variants = (False, True) if self.adapters else (False,)
        for adapters in adapter_variants:
            for P in self.page_buckets:
                if self.backend != "xla":
                    shapes += [ForwardShape(B, B, P, 1, adapters) for B in self.seq_buckets]
                shapes += [ForwardShape(T, B, P, T, adapters) for T in self.token_buckets
                           for B in self.mixed_seq_buckets(T)]  # fmt: skip
                for flavor in self.multi_step_flavors:
                    shapes += [ForwardShape(B, B, P, 1, adapters, self.decode_steps, flavor)
                               for B in self.multi_step_rows(flavor)]  # fmt: skip
        for guided in (False, True) if self.guided else (False,):
            for B in self.sampler_rows:
                shapes += [SamplerShape(B, "plain", 0, guided), SamplerShape(B, "full", 0, guided)]
                shapes += [SamplerShape(B, "penalties", P, guided) for P in self.page_buckets]
        for T in self.token_buckets:
            shapes += [HeadShape(T, False), HeadShape(T, True)]
        return shapes


@dataclasses.dataclass(frozen=True)
class ProgramNeeds:
    """The programs a known set of requests can visit (a batch job's, jaxllm/batch/job.py): the
    sampling flavors its rows may take, whether any wants prompt log-probabilities or context logits
    (the head programs), whether any is guided. `keeps(shape)` filters an engine's program set
    to them before serving; a step outside it still runs, its program compiled at first use."""

    flavors: frozenset = frozenset({"plain"})
    heads: bool = False
    guided: bool = False

    @classmethod
    def of(cls, params) -> "ProgramNeeds":
        """The needs of requests with these SamplingParams: a superset of the flavors their rows
        take (engine/step_request.py, step_inputs.sampling_flavor), erring towards more."""
        flavors, heads, guided = {"plain"}, False, False
        for p in params:
            truncates = (p.effective_temperature > 0 and (bool(p.top_k) or (p.top_p is not None and p.top_p < 1)
                                                          or bool(p.min_p)))  # fmt: skip
            if p.uses_penalties:
                flavors.add("penalties")
            if (truncates or p.logprobs or p.use_beam_search or p.prompt_logprobs is not None or p.embedding_bias is not None
                    or p.min_tokens or p.bad or p.bad_words or p.bad_token_ids or p.allowed_token_ids
                    or p.logits_processor is not None
                    or p.apply_batched_logits_processor):  # fmt: skip
                flavors.add("full")
            heads |= p.prompt_logprobs is not None or bool(p.return_context_logits)
            guided |= p.guided_decoding is not None
        return cls(frozenset(flavors), heads, guided)

    def keeps(self, shape) -> bool:
        if isinstance(shape, HeadShape):
            return self.heads
        if isinstance(shape, SamplerShape):
            return shape.flavor in self.flavors and (self.guided or not shape.guided)
        return shape.decode_steps == 1 or shape.sampling in self.flavors


def engine_buckets(config, on_gpu: bool, adapters: bool) -> Buckets:
    """The buckets of an engine of `config` (engine/runner.py:RunnerConfig), with this module's
    defaults for what it leaves None: GPU_MIN_DECODE_ROWS, MULTI_STEP_FLAVORS and
    MULTI_STEP_FULL_MAX_ROWS on GPUs, CPU_MULTI_STEP_MAX_ROWS and CPU_MULTI_STEP_FLAVORS on the CPU."""
    return Buckets(
        max_num_tokens=config.max_num_tokens, max_batch_size=config.max_batch_size,
        max_seq_len=config.max_seq_len, page_size=config.page_size, backend=config.backend,
        min_decode_rows=config.min_decode_rows or (GPU_MIN_DECODE_ROWS if on_gpu else 1),
        decode_steps=config.decode_steps,
        multi_step_max_rows=config.multi_step_max_rows or (None if on_gpu else CPU_MULTI_STEP_MAX_ROWS),
        multi_step_flavors=MULTI_STEP_FLAVORS if on_gpu else CPU_MULTI_STEP_FLAVORS,
        multi_step_full_max_rows=MULTI_STEP_FULL_MAX_ROWS if on_gpu else None,
        adapters=adapters,
        decode_batch_sizes=config.decode_batch_sizes,
        guided=config.guided,
    )  # fmt: skip


# LLM(cuda_graph_config=None), TensorRT-LLM's "no CUDA graphs": XLA records no command buffers.
NO_COMMAND_BUFFER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


def compiler_options(shape, on_gpu: bool, one_graph: bool, command_buffers: bool = True,
                     quantized: bool = False) -> dict | None:  # fmt: skip
    """XLA options the program of `shape` is compiled with (None: XLA's defaults). On GPUs:
    NO_TRITON_GEMM_OPTIONS unless it is a forward program of at most TRITON_GEMM_MAX_ROWS tokens
    (QUANTIZED_TRITON_GEMM_MAX_ROWS for a `quantized` model's);
    ONE_GRAPH_OPTIONS for a multi-step decode of at most ONE_GRAPH_MAX_ROWS rows where `one_graph`
    (RunnerConfig.one_graph_decode; by default several GPUs); without `command_buffers`
    (RunnerConfig.command_buffers) NO_COMMAND_BUFFER_OPTIONS instead of ONE_GRAPH_OPTIONS."""
    options = {}
    forward = isinstance(shape, ForwardShape)
    triton_rows = max(TRITON_GEMM_MAX_ROWS, QUANTIZED_TRITON_GEMM_MAX_ROWS if quantized else 0)
    if on_gpu and not (forward and shape.num_tokens <= triton_rows):
        options.update(NO_TRITON_GEMM_OPTIONS)
    if on_gpu and not command_buffers:
        options.update(NO_COMMAND_BUFFER_OPTIONS)
    elif forward and one_graph and shape.decode_steps > 1 and shape.num_seqs <= ONE_GRAPH_MAX_ROWS:
        options.update(ONE_GRAPH_OPTIONS)
    return options or None
