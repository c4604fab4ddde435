"""The requests a benchmark sends: fixed-length random token ids, a ShareGPT-like synthetic mix, or a
JSONL file of prompts.

Nothing here imports JAX (benchmarks/common.py delegates to these generators before its scripts set
XLA_FLAGS). Synthetic prompts are random token ids kept `margin` away from both ends of the
vocabulary (where special tokens usually sit), seeded: the same arguments give the same requests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request of a benchmark.

    prompt: text, or a list of token ids.
    output_len: the tokens to generate (max_tokens; with ignore_eos, exactly these).
    """

    prompt: str | list[int]
    output_len: int

    @property
    def prompt_len(self) -> int | None:
        """Its prompt's token count when the prompt is token ids (None for text: the model's tokenizer counts)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def random_token_prompts(n: int, length: int, vocab: int, seed: int, margin: int = 10) -> list[list[int]]:
    """n prompts of `length` random token ids in [margin, vocab - margin), seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(margin, vocab - margin, size=length)] for _ in range(n)]


def sharegpt_like(n: int, prompt_mean: float, output_mean: float, sigma: float, max_prompt: int, max_output: int,
                  vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """n (prompt token ids, output length) pairs with lognormal lengths of the given means.

    ShareGPT's conversations have long-tailed prompt and reply lengths; a lognormal with log-sd
    `sigma` and mu = log(mean) - sigma^2 / 2 has exactly the requested mean before clipping to
    [4, max_prompt] and [4, max_output] (clipping moves the sample means a little).

    Returns (prompts, output lengths), both of length n.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    mu_p, mu_o = np.log(prompt_mean) - sigma**2 / 2, np.log(output_mean) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu_p, sigma, n), 4, max_prompt).astype(int)
    outputs = np.clip(rng.lognormal(mu_o, sigma, n), 4, max_output).astype(int)
    prompts = [[int(t) for t in rng.integers(10, vocab - 10, size=L)] for L in lengths]
    return prompts, [int(o) for o in outputs]


def fixed_requests(n: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[BenchRequest]:
    """n requests of `input_len` random token ids, each generating `output_len` tokens."""
    return [BenchRequest(p, output_len) for p in random_token_prompts(n, input_len, vocab, seed)]


def sharegpt_like_requests(n: int, vocab: int, seed: int, prompt_mean: float, output_mean: float, sigma: float,
                           max_prompt: int, max_output: int) -> list[BenchRequest]:  # fmt: skip
    """The ShareGPT-like mix (`sharegpt_like`) as requests."""
    prompts, outputs = sharegpt_like(n, prompt_mean, output_mean, sigma, max_prompt, max_output, vocab, seed)
    return [BenchRequest(p, o) for p, o in zip(prompts, outputs)]


def jsonl_requests(path: str | Path, default_output_len: int, limit: int | None = None) -> list[BenchRequest]:
    """The requests of a JSONL file: each non-empty line an object with "prompt" (text) or
    "prompt_token_ids" (a list of ints), and optionally "output_len" (default `default_output_len`).
    `limit`: at most that many, from the top.

    Raises FileNotFoundError, or ValueError naming the file and line of a malformed one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    requests = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
            ids, text = row.get("prompt_token_ids"), row.get("prompt")
            if ids is not None:
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids)):
                    raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of non-negative ints")
                prompt = ids
            elif isinstance(text, str) and text:
                prompt = text
            else:
                raise ValueError(f"{where}: needs a non-empty 'prompt' string or 'prompt_token_ids'")
            output_len = row.get("output_len", default_output_len)
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f"{where}: output_len must be a positive int, got {output_len!r}")
            requests.append(BenchRequest(prompt, output_len))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests
