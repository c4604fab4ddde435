"""DisaggregatedParams: split one request's prefill and decode across two LLM instances.

TensorRT-LLM's names. A `context_only` request runs the prompt's prefill on one `LLM`, samples the
first token and returns, in `CompletionOutput.disaggregated_params`, that token (`first_gen_tokens`),
the context request's id (`ctx_request_id`) and an `opaque_state` (bytes) that tells another `LLM`
where to fetch the prompt's KV pages. A `generation_only` request on that other `LLM` (same
process or another one, same model, dtype and KV layout) passes the same prompt with those
parameters: it receives the pages, continues from the first token, and its output is the tokens one
aggregated request would have produced. `context_and_generation` (or None) is an ordinary request.
The transfer itself lives in jaxllm/engine/kv_transfer.py.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

REQUEST_TYPES = ("context_only", "generation_only", "context_and_generation")


@dataclasses.dataclass(kw_only=True)
class DisaggregatedParams:
    request_type: Optional[str] = None
    first_gen_tokens: Optional[List[int]] = None
    ctx_request_id: Optional[int] = None
    opaque_state: Optional[bytes] = None
    draft_tokens: Optional[List[int]] = None
    disagg_request_id: Optional[int] = None

    def __post_init__(self):
        if self.request_type is not None:
            if not isinstance(self.request_type, str) or self.request_type.lower() not in REQUEST_TYPES:
                raise ValueError(
                    f"DisaggregatedParams.request_type={self.request_type!r} is invalid; allowed: "
                    f"{', '.join(map(repr, REQUEST_TYPES))} or None"
                )
            self.request_type = self.request_type.lower()
        if self.first_gen_tokens is not None and (
            not isinstance(self.first_gen_tokens, (list, tuple))
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.first_gen_tokens)
        ):
            raise TypeError(f"DisaggregatedParams.first_gen_tokens must be a list of token ids, got {self.first_gen_tokens!r}")
        if self.opaque_state is not None and not isinstance(self.opaque_state, (bytes, bytearray)):
            raise TypeError(f"DisaggregatedParams.opaque_state must be bytes, got {type(self.opaque_state).__name__}")
        if self.draft_tokens:
            raise ValueError("DisaggregatedParams.draft_tokens: speculative decoding is not supported; allowed: None")
