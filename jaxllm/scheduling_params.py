"""SchedulingParams: how the engine orders a request against others (TensorRT-LLM's names).

`priority` is TensorRT-LLM's executor request priority: a number in [0, 1], default 0.5. Under
contention (more requests than the step's token / sequence budget or the KV cache holds), higher
priorities are admitted and scheduled first, and lower priorities are preempted first when pages run
out; requests of equal priority keep first-come-first-served order.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

DEFAULT_PRIORITY = 0.5


@dataclasses.dataclass(kw_only=True)
class SchedulingParams:
    """Per-request scheduling parameters.

    Args:
      priority: in [0.0, 1.0]; higher runs first under contention (default 0.5).
      attention_dp_rank, attention_dp_relax: attention data parallelism placement (TensorRT-LLM);
        jaxllm has no attention data parallelism, so attention_dp_rank must stay None.
      agent_hierarchy: TensorRT-LLM's agent-tree scheduling hint; not supported, must stay None.
    """

    priority: float = DEFAULT_PRIORITY
    attention_dp_rank: Optional[int] = None
    attention_dp_relax: bool = True
    agent_hierarchy: Optional[List[Tuple[str, int]]] = None

    def __post_init__(self):
        p = self.priority
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"SchedulingParams.priority={p!r} is invalid; allowed: a number in [0.0, 1.0]")
        if self.attention_dp_rank is not None:
            raise ValueError(
                f"SchedulingParams.attention_dp_rank={self.attention_dp_rank!r}: jaxllm has no attention data "
                "parallelism; allowed: None"
            )
        if not isinstance(self.attention_dp_relax, bool):
            raise TypeError(f"SchedulingParams.attention_dp_relax must be a bool, got {self.attention_dp_relax!r}")
        if self.agent_hierarchy is not None:
            raise ValueError("SchedulingParams.agent_hierarchy is not supported by jaxllm; allowed: None")
