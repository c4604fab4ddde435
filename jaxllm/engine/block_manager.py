"""The KV page allocator (plain Python, no JAX).

Pages are the blocks of the paged KV cache; page 0 is the null page that padding writes into and
is never handed out. Pages are reference-counted so that parallel samples of one prompt (n > 1)
share the prompt's full pages; a page returns to the free list when its last holder lets go.
"""

from __future__ import annotations

import collections

from jaxllm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: collections.deque[int] = collections.deque(range(1, num_blocks))
        self.total_allocated = 0  # pages handed out since start (allocTotalBlocks)
        self.total_shared = 0  # page references shared instead of allocated (reusedBlocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Pages `seq` must add to hold its computed tokens plus `num_new_tokens` more."""
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_new_tokens` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_blocks):
            raise RuntimeError(f"out of KV pages: need {needed}, {len(self.free_blocks)} free")
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        self.total_allocated += needed

    def share_prefix(self, source: Sequence, target: Sequence, num_tokens: int) -> int:
        """Give `target` (which holds no pages) the full pages of `source` covering up to `num_tokens`
        tokens; returns how many tokens `target` now has computed."""
        if target.block_table:
            raise RuntimeError("share_prefix needs a target without pages")
        num_full = min(num_tokens, source.num_computed) // self.block_size
        blocks = source.block_table[:num_full]
        for block in blocks:
            self.ref_counts[block] += 1
        target.block_table = list(blocks)
        self.total_shared += len(blocks)
        return len(blocks) * self.block_size

    def free(self, seq: Sequence) -> None:
        """Release every page of `seq` (shared pages stay until their last holder frees them)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
            elif self.ref_counts[block] < 0:
                raise RuntimeError(f"page {block} freed more often than it was held")
        seq.block_table = []
        seq.num_computed = 0
