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

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from ..arch import Adapter
from .plan import GraftPlan, compile_plan, first_grafted_position, prefix_signature
from ..spec import GraftSpec
from .tokens import PaddedBatch, TokenizedPrompt, pad_left

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


# ---------------------------------------------------------------------------------------------
# Prefix surgery: which rows share which prefix, and the two passes that share it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedPrefix:
    """How one row shares a prefix pass: rows with equal ``key`` (prompt ids, prefix signature)
    share one; the row takes its first ``length`` positions from it (0: shares nothing); ``spec``
    is set when the shared prefix carries grafts (the row's spec, equal to its group's there)."""

    key: Any
    length: int
    spec: GraftSpec | None = None


def shareable_prefixes(specs: Sequence[GraftSpec], prompts: Sequence[TokenizedPrompt]) -> list[SharedPrefix]:
    """Per row, which prefix pass it may share and how many leading positions it takes from it.

    Rows of one prompt whose grafts before the last token are the same (FE+LT with different
    last-token parts, say) share a *grafted* prefix: everything but the last token, computed
    once with those grafts. Other rows of a prompt share its ungrafted prefix: the positions
    before their first graft, computed once by P. Always leaves the last token to run (for its
    logits). Nothing is shared for a prompt that occurs once."""
    counts = Counter(p.ids for p in prompts)
    if all(c == 1 for c in counts.values()):
        return [SharedPrefix((p.ids, ()), 0) for p in prompts]
    signatures = [prefix_signature(s, p) if counts[p.ids] > 1 else () for s, p in zip(specs, prompts)]
    groups = Counter((p.ids, sig) for p, sig in zip(prompts, signatures))
    out = []
    for spec, prompt, sig in zip(specs, prompts, signatures):
        n = len(prompt)
        if counts[prompt.ids] == 1:
            out.append(SharedPrefix((prompt.ids, ()), 0))
        elif sig and groups[(prompt.ids, sig)] > 1:
            out.append(SharedPrefix((prompt.ids, sig), n - 1, spec))
        else:
            first = first_grafted_position(spec, prompt)
            out.append(SharedPrefix((prompt.ids, ()), min(n - 1, n if first is None else first)))
    return out


def forward_on_prefix(forward: Callable[..., tuple[torch.Tensor, Any]], plan: GraftPlan,
                      prompts: list[TokenizedPrompt], prefixes: list[SharedPrefix], *, adapter: Adapter,
                      config: Any, device: Any, pad_id: int) -> torch.Tensor | None:
    """Last-column logits of ``plan`` on ``prompts``: one prefix pass computes every distinct
    shared prefix of these rows (P's own, or with the grafts their rows share there) and keeps
    its KV cache, then every row runs its own suffix on that cache. ``forward(plan, batch, *,
    cache=, use_cache=)`` runs one pass (a cache-keeping backend's, e.g. ``Grafter.forward``).
    ``None`` when the model's cache does not hold the whole prefix (sliding-window layers): run
    it plainly."""
    keys: dict[Any, tuple[TokenizedPrompt, int, GraftSpec]] = {}
    for prompt, share in zip(prompts, prefixes):
        if share.length:
            _, longest, spec = keys.get(share.key, (prompt, 0, share.spec or GraftSpec()))
            keys[share.key] = (prompt, max(longest, share.length), spec)
    where = {key: i for i, key in enumerate(keys)}
    heads = list(keys.values())
    head = pad_left([p.ids[:n] for p, n, _ in heads], pad_id, device)
    width = head.input_ids.shape[1]
    lengths = [n for _, n, _ in heads]
    head_plan = GraftPlan([], len(heads), width)
    if any(spec.rules for _, _, spec in heads):  # grafted prefixes: their cells before the cut
        full = compile_plan([spec for _, _, spec in heads], adapter, config, [p for p, _, _ in heads])
        head_end = torch.tensor(lengths)
        head_plan = full.remap(lambda rows, t: t < head_end[rows], [len(p) for p, _, _ in heads], width,
                               [width - n for n in lengths])
        head_plan.modules = [m for m in head_plan.modules if m.path != adapter.lm_head]
    _, cache = forward(head_plan, head, use_cache=True)
    if not cache_holds(cache, width):
        return None
    # CPU indices: each cache layer indexes with them on its own device (a model split over devices
    # keeps each layer's keys and values on that layer's device)
    cache.batch_select_indices(torch.tensor([where.get(s.key, 0) for s in prefixes]))
    # Row r sees the first `taken[r]` positions of its prefix, which sits right-aligned.
    taken = torch.tensor([s.length for s in prefixes])
    column = torch.arange(width)
    starts = torch.tensor([width - keys[s.key][1] if s.length else width for s in prefixes])[:, None]
    seen = (column >= starts) & (column < starts + taken[:, None])
    tail = pad_left([p.ids[s.length:] for p, s in zip(prompts, prefixes)], pad_id, device)
    batch = PaddedBatch(tail.input_ids, torch.cat([seen.to(tail.attention_mask), tail.attention_mask], dim=1),
                        tail.position_ids + taken[:, None].to(device), tail.pad)
    # Each row's own cells from its cut on (those before it are in the shared prefix).
    lengths = [len(p) for p in prompts]
    mine = plan.remap(lambda rows, t: t >= taken[rows], lengths, tail.input_ids.shape[1],
                      [pad - s.length for pad, s in zip(tail.pad, prefixes)])
    grafted = torch.tensor([s.spec is not None for s in prefixes])
    dropped = plan.remap(lambda rows, t: (t < taken[rows]) & ~grafted[rows], lengths, 1, [0] * len(prompts))
    if dropped.modules:  # an ungrafted prefix must hold no cell
        raise AssertionError("internal error: a graft fell inside a shared ungrafted prefix")  # pragma: no cover
    logits, _ = forward(mine, batch, cache=cache)
    return logits


def cache_holds(cache: Any, width: int) -> bool:
    """Whether every layer of a KV cache holds all ``width`` positions (sliding-window layers may
    keep fewer, and then a shared prefix cannot be used)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[-2] != width:
            return False
    return True
