"""Paged KV for the decode loop: the slots' generated keys and values live in one pool of pages
handed out from a free list as traces grow and given back when they end, so that memory holds the
live tokens, not slots x max_new_tokens (`SamplingConfig.kv_pages`).

The pool has N = kv_pages pages of `kv_page_slots` slots each; page 0 is scratch (never handed
out): every page-table entry that holds no page points at it, so idle slots and slots waiting for
a page write there. Slot b's generated token t lives in page table[b, t // kv_page_slots] at
offset t % kv_page_slots.

Each decode step, a slot about to write the first token of a page takes one (`allocate`), the
longest traces first, while pages last; a slot that gets none waits (its step is skipped and
redone when a page is free). A trace that ends gives back its pages (`release`). When every live
slot waits, the shortest trace holding pages gives them back and starts over (`evict`,
preemption by recomputation as in vLLM): the longest traces always go on, so the loop cannot
stall as long as the pool holds one whole trace. With a key per prompt a trace's tokens depend
only on its trace number and positions (`sampler.draw_keys`), so a trace redone is the same
trace. All of it is O(B x S / kv_page_slots) per step, independent of the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class FreeList:
    """The free pages: ids[:count] (a stack; page 0, the scratch page, is never on it)."""

    ids: jax.Array    # int32 [N - 1]
    count: jax.Array  # int32 []

    @classmethod
    def full(cls, pages: int) -> FreeList:
        """Every page but the scratch page 0 free."""
        return cls(ids=jnp.arange(1, pages, dtype=jnp.int32),
                   count=jnp.asarray(pages - 1, jnp.int32))


def allocate(table: jax.Array, free: FreeList, need: jax.Array, index: jax.Array,
             kv_page_slots: int):
    """Slots with `need` (bool [B]) take a page each for their slot index[b] (int32 [B], the
    tokens of their trace so far): ranked longest trace first (ties: lower slot first), rank r
    takes page ids[count - 1 - r] if r < count. Returns (table [B, M] with
    table[b, index[b] // kv_page_slots] set for the granted slots, free list, granted bool
    [B])."""
    b = need.shape[0]
    order = jnp.argsort(jnp.where(need, -index, 1), stable=True)             # needing first
    rank = jnp.zeros(b, jnp.int32).at[order].set(jnp.arange(b, dtype=jnp.int32))
    granted = need & (rank < free.count)
    pick = free.ids[jnp.clip(free.count - 1 - rank, 0, free.ids.shape[0] - 1)]
    rows = jnp.where(granted, jnp.arange(b), b)                              # b: dropped
    table = table.at[rows, index // kv_page_slots].set(pick, mode="drop")
    return table, free.replace(count=free.count - jnp.sum(granted, dtype=jnp.int32)), granted


def release(table: jax.Array, free: FreeList, finishing: jax.Array, length: jax.Array,
            kv_page_slots: int):
    """The pages of the finishing slots (bool [B]), table[b, :ceil(length[b] / kv_page_slots)],
    pushed on the free list in slot order; their table rows go back to the scratch page. Returns
    (table, free list)."""
    held = -(-length // kv_page_slots)                                       # [B]
    give = finishing[:, None] & (jnp.arange(table.shape[1]) < held[:, None])  # [B, M]
    flat = give.reshape(-1).astype(jnp.int32)
    at = free.count + jnp.cumsum(flat) - flat
    ids = free.ids.at[jnp.where(flat > 0, at, free.ids.shape[0])].set(table.reshape(-1),
                                                                       mode="drop")
    return (jnp.where(finishing[:, None], 0, table),
            FreeList(ids=ids, count=free.count + jnp.sum(flat, dtype=jnp.int32)))


def evict(table: jax.Array, free: FreeList, stuck: jax.Array, live: jax.Array,
          length: jax.Array, kv_page_slots: int):
    """When `stuck` (bool []: every live slot waits for a page), the live slot with the fewest
    tokens that holds a page gives its pages back (`release`). Returns (table, free list,
    evicted bool [B]: that slot, which starts its trace over; none when not stuck)."""
    holds = live & (length > 0)
    shortest = jnp.argmin(jnp.where(holds, length, jnp.iinfo(jnp.int32).max))
    evicted = stuck & holds & (jnp.arange(live.shape[0]) == shortest)
    table, free = release(table, free, evicted, length, kv_page_slots)
    return table, free, evicted
