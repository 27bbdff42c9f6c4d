"""Pack (spec, prompt) rows into forward passes, sharing each prompt's ungrafted prefix.

In a causal model, a row's hidden states equal P's at every position before its first grafted
position ``t0`` (nothing before ``t0`` can see the graft). So when several rows share a prompt —
K specs on one prompt, the usual shape of a study — P's keys and values for positions
``0 … t0-1`` are computed once, in one plain forward of the prompt prefix, and every row then runs
only its own columns ``t0 …`` on top of that KV cache::

    prefix pass:   P(prompt[:L])                    → KV cache   (once per prompt, no graft)
    suffix pass:   P+graft(prompt[t0:] | KV cache)  → logits     (one row per spec)

This is the same computation, not an approximation: the suffix pass attends to exactly the keys
and values the full pass would have computed (positions and the attention mask are given
explicitly), and every graft sits in the suffix. On CPU, where a forward costs in proportion to
the token positions it computes, a grid of 32 specs on a 20-token prompt computes ~4.5× fewer
positions (see docs/benchmarks.md).

:func:`schedule_rows` chooses the passes: rows sorted by suffix length, cut into chunks of at most
``batch_size`` rows by a small dynamic program over the cost (token positions computed, plus a
fixed ``call_cost`` per forward pass); each chunk shares prefixes only when that is cheaper.

Example:
    >>> rows = [Row(index=i, key=(1, 2, 3, 4), length=4, prefix=3) for i in range(8)]
    >>> [(c.indices, c.shared) for c in schedule_rows(rows, batch_size=32, call_cost=2)]
    [([0, 1, 2, 3, 4, 5, 6, 7], True)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

# Rough machine constants for the scheduler's cost model (only ratios matter, and only roughly).
# Fixed time of one forward pass (Python in every module, tokenizing, the nnsight trace): measured
# on SmolLM2-135M (30 layers) on CPU, a 1-token pass takes 40 ms and each further token 2.2 ms.
CALL_SECONDS, CALL_SECONDS_PER_LAYER = 0.005, 0.0012
CPU_FLOPS, ACCELERATOR_FLOPS = 1e11, 2e14  # a few CPU cores; a data-centre GPU in bf16
ACCELERATOR_BYTES_PER_SECOND = 2e12  # a pass reads every weight once: small passes are memory-bound


@dataclass(frozen=True)
class Row:
    """One (spec, prompt) row: ``key`` identifies the prompt (its token ids), ``length`` its token
    count, ``prefix`` how many leading positions are ungrafted and may come from a shared KV cache
    (0: this row cannot share)."""

    index: int
    key: Hashable
    length: int
    prefix: int = 0

    @property
    def suffix(self) -> int:
        return self.length - self.prefix


@dataclass(frozen=True)
class Chunk:
    """Rows (by index) run in one forward pass; ``shared``: after one prefix pass for their prompts."""

    indices: list[int]
    shared: bool


def default_call_cost(model: Any, n_layers: int) -> float:
    """The price of one forward pass of ``model`` (``n_layers`` deep), in token positions: the
    fixed time of a pass (:data:`CALL_SECONDS` plus :data:`CALL_SECONDS_PER_LAYER` per layer, plus reading every weight
    once on an accelerator) over the time one position takes (2 FLOPs per parameter). About 15 for
    SmolLM2-135M on a CPU (sharing pays off); thousands for a tiny test model, whose passes are all
    fixed cost (it does not).

    Example:
        >>> from nngraft.testing import tiny_model
        >>> default_call_cost(tiny_model("llama"), n_layers=2) > 1000
        True
    """
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    device = params[0].device if params else None
    fixed, flops = CALL_SECONDS + CALL_SECONDS_PER_LAYER * n_layers, CPU_FLOPS
    if device is not None and device.type not in ("cpu", "meta"):
        flops = ACCELERATOR_FLOPS
        fixed += sum(p.numel() * p.element_size() for p in params) / ACCELERATOR_BYTES_PER_SECOND
    return max(1.0, fixed / (2 * max(count, 1) / flops))


def schedule_rows(rows: Sequence[Row], batch_size: int, call_cost: float) -> list[Chunk]:
    """Chunks of at most ``batch_size`` rows covering every row once, minimizing the estimated
    cost: per forward pass ``call_cost`` + rows × padded width, where a shared chunk's width is its
    longest suffix and it pays one more pass for the prefixes (each prompt's longest prefix in the
    chunk, computed once). Deterministic: depends only on the rows given."""
    order = sorted(rows, key=lambda r: (r.suffix, r.length, str(r.key), r.index))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    choice: list[tuple[int, bool]] = [(0, False)] * (n + 1)
    for i in range(n):
        longest = longest_suffix = prefix_positions = 0
        all_share = True
        prefixes: dict[Hashable, int] = {}
        for j in range(i, min(n, i + batch_size)):
            row = order[j]
            longest = max(longest, row.length)
            longest_suffix = max(longest_suffix, row.suffix)
            if row.prefix > prefixes.get(row.key, 0):
                prefix_positions += row.prefix - prefixes.get(row.key, 0)
                prefixes[row.key] = row.prefix
            all_share = all_share and row.prefix > 0
            count = j - i + 1
            plain = best[i] + call_cost + count * longest
            shared = (best[i] + 2 * call_cost + count * longest_suffix + prefix_positions
                      if all_share else float("inf"))
            cost, use = (shared, True) if shared < plain else (plain, False)
            if cost < best[j + 1]:
                best[j + 1] = cost
                choice[j + 1] = (i, use)
    chunks: list[Chunk] = []
    end = n
    while end > 0:
        start, use = choice[end]
        chunks.append(Chunk([r.index for r in order[start:end]], use))
        end = start
    return chunks[::-1]
