"""Compile specs into a :class:`GraftPlan`: which module outputs to replace, at which (row, column).

    spec (data)  ──compile──▶  GraftPlan (plain tensors and strings)  ──execute──▶  logits

The plan is everything the trace needs and nothing else: per module, in forward order, the row and
column indices (into the left-padded batch) where the donor's output replaces the recipient's,
and for fused projections the output features that belong to the grafted component. Rows of one
batch may carry different specs. A plan holds no pydantic objects, so it can travel in a remote
request.

Example:
    >>> from nngraft.spec import GraftSpec, GraftRule, Last
    >>> from nngraft.arch import adapter_for_model_type
    >>> from types import SimpleNamespace
    >>> from nngraft.compile.tokens import TokenizedPrompt
    >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])])
    >>> cfg = SimpleNamespace(num_hidden_layers=2)
    >>> plan = compile_plan([spec], adapter_for_model_type("llama"), cfg,
    ...                     [TokenizedPrompt("a b c", (5, 6, 7))])
    >>> [(m.path, m.cols.tolist()) for m in plan.modules]
    [('model.layers.1.mlp', [2])]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..arch import Adapter, Site
from ..errors import PositionError, SpecError
from ..spec import All, GraftSpec, Index, Last, Not, Other, Span, resolve_layers
from .tokens import TokenizedPrompt

# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def select_positions(selector: Any, prompt: TokenizedPrompt, *, row: int = 0, length: int | None = None,
                     other: frozenset[int] = frozenset()) -> set[int]:
    """Token indices (0 = first real token) that ``selector`` names in ``prompt``.

    ``length`` overrides the prompt's length (generation grows the sequence); ``other`` is the set
    the spec's ``{"other": true}`` stands for.
    """
    n = len(prompt) if length is None else length
    if isinstance(selector, Span):
        if selector.span not in prompt.spans:
            given = ", ".join(sorted(prompt.spans)) or "none"
            raise PositionError(
                f"prompt {row}: the spec grafts at span {selector.span!r}, but no text was given "
                f"for it (spans given: {given}); pass spans=[{{{selector.span!r}: '...'}}, ...]"
            )
        return set(prompt.spans[selector.span])
    if isinstance(selector, Last):
        return {n - 1}
    if isinstance(selector, All):
        return set(range(n))
    if isinstance(selector, Other):
        return set(other)
    if isinstance(selector, Index):
        out = set()
        for i in selector.index:
            if not -len(prompt) <= i < n:
                raise PositionError(
                    f"prompt {row}: position index {i} is out of range for a prompt of "
                    f"{len(prompt)} tokens ({prompt.text!r})"
                )
            out.add(i % n)
        return out
    if isinstance(selector, Not):
        named = set().union(*(select_positions(s, prompt, row=row, length=n, other=other)
                              for s in selector.not_))
        return set(range(n)) - named
    raise TypeError(f"unknown position selector {selector!r}")


def _other_positions(spec: GraftSpec, prompt: TokenizedPrompt, row: int, length: int) -> frozenset[int]:
    named: set[int] = set()
    for rule in spec.rules:
        for selector in rule.positions:
            if not isinstance(selector, Other):
                named |= select_positions(selector, prompt, row=row, length=length)
    return frozenset(set(range(length)) - named)


def _positions_per_rule(spec: GraftSpec, prompt: TokenizedPrompt) -> list[tuple[Any, set[int]]]:
    """Each rule of ``spec`` with the token positions it names in ``prompt``."""
    n = len(prompt)
    other = _other_positions(spec, prompt, 0, n) if _uses_other(spec) else frozenset()
    return [(rule, set().union(*(select_positions(s, prompt, length=n, other=other) for s in rule.positions)))
            for rule in spec.rules]


def first_grafted_position(spec: GraftSpec, prompt: TokenizedPrompt) -> int | None:
    """The first token position any rule of ``spec`` grafts at in ``prompt`` (``None``: none).

    Every position before it computes exactly what P computes, so it may come from a KV cache
    shared with other rows of the same prompt (:mod:`nngraft.compile.schedule`)."""
    named = set().union(*(positions for _, positions in _positions_per_rule(spec, prompt)))
    return min(named) if named else None


def prefix_signature(spec: GraftSpec, prompt: TokenizedPrompt) -> tuple:
    """What ``spec`` grafts before ``prompt``'s last token, as hashable data: per rule, its content
    (components, layers, donor, weights) and the positions it names there. Rows of one prompt with
    equal signatures compute identical states before the last token, so they may share one
    grafted prefix pass (:mod:`nngraft.compile.schedule`). ``()``: nothing is grafted there."""
    last = len(prompt) - 1
    parts = []
    for rule, positions in _positions_per_rule(spec, prompt):
        before = tuple(sorted(p for p in positions if p < last))
        if before:
            parts.append((rule.model_dump_json(exclude={"positions"}), before))
    return tuple(sorted(parts))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class ModuleGraft:
    """Replace ``path``'s output at ``(rows, cols)`` with the donor's.

    ``features``: ``None`` for the whole output, else the output features to replace (a fused
    projection's q, k or v part). One module may appear several times (q and k of GPT-2's
    ``c_attn`` at different positions); consecutive entries of one path run as one hook."""

    path: str
    components: tuple[str, ...]
    layer: int | None
    rows: torch.Tensor
    cols: torch.Tensor
    features: torch.Tensor | None = None
    token_axis: int = 1
    donor: str = "default"

    @property
    def count(self) -> int:
        return int(self.rows.numel())


@dataclass
class DerivedDonor:
    """A donor made from another by keeping only part of its weight change (``rule.weights``).

    ``selection`` is the rule's :class:`~nngraft.spec.WeightSelection` as a plain dict;
    ``components`` the rule's components (groups expanded) — with ``top_percent`` ranked per
    layer, entries compete across all of them within a layer."""

    base: str
    selection: dict
    components: tuple[str, ...] = ()


@dataclass
class GraftPlan:
    """Module grafts in forward order for a batch of ``batch_size`` rows × ``seq_len`` columns.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])])
        >>> plan = Grafter(*tiny_pair("llama")).plan(spec, ["Ada Lovelace stars in", "Ada"])
        >>> print(plan.summary())
        GraftPlan: 1 module grafts over 2×7
          model.layers.1.mlp (gate+up+down): 2 positions
        >>> plan.modules[0].rows.tolist(), plan.modules[0].cols.tolist()  # (row, column) cells, left-padded
        ([0, 1], [6, 6])
    """

    modules: list[ModuleGraft] = field(default_factory=list)
    batch_size: int = 0
    seq_len: int = 0
    derived: dict[str, DerivedDonor] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.modules

    def by_path(self) -> list[tuple[str, list[ModuleGraft]]]:
        """Group consecutive grafts of the same module (each group is one nnsight hook)."""
        groups: list[tuple[str, list[ModuleGraft]]] = []
        for graft in self.modules:
            if groups and groups[-1][0] == graft.path:
                groups[-1][1].append(graft)
            else:
                groups.append((graft.path, [graft]))
        return groups

    def last_columns(self, k: int) -> "GraftPlan":
        """The part of the plan on the last ``k`` columns, re-indexed to a ``k``-column input.

        Used for generation with a KV cache, where each step feeds only the new tokens."""
        out = []
        for graft in self.modules:
            keep = graft.cols >= self.seq_len - k
            if keep.any():
                out.append(ModuleGraft(graft.path, graft.components, graft.layer, graft.rows[keep],
                                       graft.cols[keep] - (self.seq_len - k), graft.features,
                                       graft.token_axis, graft.donor))
        return GraftPlan(out, self.batch_size, k, self.derived)

    def lm_head_on_last_column(self, lm_head: str) -> "GraftPlan":
        """This plan for a forward that computes logits only for the last column
        (``logits_to_keep=1``): the LM head (module path ``lm_head``) then sees a one-column
        input, so its grafts are re-indexed to that column; other modules are unchanged."""
        if not any(m.path == lm_head for m in self.modules):
            return self
        head = GraftPlan([m for m in self.modules if m.path == lm_head], self.batch_size, self.seq_len)
        rest = [m for m in self.modules if m.path != lm_head]
        return GraftPlan(rest + head.last_columns(1).modules, self.batch_size, self.seq_len, self.derived)

    def remap(self, keep_position: Any, lengths: Sequence[int], width: int,
              new_pad: Sequence[int]) -> "GraftPlan":
        """The cells whose token position ``t`` satisfies ``keep_position(rows, t)`` (tensors),
        moved from this plan's left-padded layout (prompt lengths ``lengths``) to a layout of
        ``width`` columns where row ``r``'s position ``t`` sits at column ``new_pad[r] + t``."""
        length = torch.tensor(list(lengths), dtype=torch.long)
        pad = torch.tensor(list(new_pad), dtype=torch.long)
        out = []
        for graft in self.modules:
            position = graft.cols - (self.seq_len - length[graft.rows])
            keep = keep_position(graft.rows, position)
            if keep.any():
                rows = graft.rows[keep]
                out.append(ModuleGraft(graft.path, graft.components, graft.layer, rows,
                                       pad[rows] + position[keep], graft.features, graft.token_axis, graft.donor))
        return GraftPlan(out, self.batch_size, width, self.derived)

    def summary(self) -> str:
        lines = [f"GraftPlan: {len(self.modules)} module grafts over {self.batch_size}×{self.seq_len}"]
        for g in self.modules:
            feats = "" if g.features is None else f" features[{g.features.numel()}]"
            donor = "" if g.donor == "default" else f" from {g.donor!r}"
            lines.append(f"  {g.path}{feats} ({'+'.join(g.components)}){donor}: {g.count} positions")
        return "\n".join(lines)


def rule_targets(spec: GraftSpec, adapter: Adapter, n_layers: int) -> list[list[tuple[str, int | None]]]:
    """For each rule, the (component, layer) pairs it grafts."""
    out = []
    for r, rule in enumerate(spec.rules):
        where = f"spec {spec.name!r} rules[{r}]"
        block, global_ = adapter.expand(list(rule.components), rule=where)
        targets: list[tuple[str, int | None]] = [(c, None) for c in global_]
        if block:
            try:
                layers = resolve_layers(rule.layers, n_layers, spec.layer_groups)
            except Exception as error:
                raise type(error)(f"{where}.layers: {error}") from None
            targets += [(c, layer) for layer in layers for c in block]
        out.append(targets)
    return out


def compile_plan(
    specs: Sequence[GraftSpec],
    adapter: Adapter,
    config: Any,
    prompts: Sequence[TokenizedPrompt],
    *,
    lengths: Sequence[int] | None = None,
    collapse_mlp: bool = True,
) -> GraftPlan:
    """Compile one spec per row into a plan for the left-padded batch of ``prompts``.

    ``lengths`` (default: the prompts' lengths) lets generation evaluate selectors on a grown
    sequence. With ``collapse_mlp``, an MLP whose every projection is grafted at the same
    positions is grafted as one module (cheaper, and exactly equal: an MLP is position-wise).

    Example:
        >>> from nngraft import GraftRule, GraftSpec, Last, adapter_for, compile_plan
        >>> from nngraft.compile.tokens import tokenize_prompt
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> spec = GraftSpec(rules=[GraftRule(components=["q", "k"], layers="last:1", positions=[Last()])])
        >>> plan = compile_plan([spec], adapter_for(P), P.config, [tokenize_prompt(tok, "Ada Lovelace stars in")])
        >>> [(m.path, m.cols.tolist()) for m in plan.modules]
        [('model.layers.1.self_attn.q_proj', [6]), ('model.layers.1.self_attn.k_proj', [6])]
    """
    if len(specs) != len(prompts):
        raise ValueError(f"compile_plan got {len(specs)} specs for {len(prompts)} prompts")
    n_layers = adapter.n_layers(config)
    lengths = [len(p) for p in prompts] if lengths is None else list(lengths)
    width = max(lengths)
    cache: dict[int, list[list[tuple[str, int | None]]]] = {}
    # (component, layer, donor) -> list of (row, col)
    chosen: dict[tuple[str, int | None, str], list[tuple[int, int]]] = {}
    derived: dict[str, DerivedDonor] = {}
    for row, (spec, prompt) in enumerate(zip(specs, prompts)):
        if not spec.rules:
            continue
        targets = cache.get(id(spec))
        if targets is None:
            targets = cache[id(spec)] = rule_targets(spec, adapter, n_layers)
        n = lengths[row]
        pad = width - n
        other = _other_positions(spec, prompt, row, n) if _uses_other(spec) else frozenset()
        for rule, targets_of_rule in zip(spec.rules, targets):
            positions: set[int] = set()
            for selector in rule.positions:
                positions |= select_positions(selector, prompt, row=row, length=n, other=other)
            cells = [(row, pad + p) for p in sorted(positions)]
            donor = rule.donor or "default"
            if rule.weights is not None:  # a parameter-level graft: a donor derived from `donor`
                comps = tuple(dict.fromkeys(c for c, _ in targets_of_rule))
                tag = hashlib.sha256(",".join(comps).encode()).hexdigest()[:6]
                base, donor = donor, f"{donor}~{rule.weights.key()}~{tag}"
                derived.setdefault(donor, DerivedDonor(base, rule.weights.model_dump(exclude_none=True), comps))
            for component, layer in targets_of_rule:
                chosen.setdefault((component, layer, donor), []).extend(cells)
    _check_donor_conflicts(chosen, specs)
    sites = []
    for donor in dict.fromkeys(key[2] for key in chosen):
        mine = {(c, l): cells for (c, l, d), cells in chosen.items() if d == donor}
        # One MLP module per layer can only stand in for its projections when a single donor
        # grafts there (nnsight cannot reach a projection inside a module it already ran), and a
        # partial ΔW is defined per parameter: then graft the projections themselves.
        merge = collapse_mlp and len({key[2] for key in chosen}) == 1 and donor not in derived
        sites += [(*site, donor) for site in _sites(mine, adapter, config, merge)]
    # Forward order (stable: one module grafted from two donors stays one group).
    sites.sort(key=lambda item: _forward_rank(item[0], adapter, n_layers))
    modules = []
    cells_of: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for site, where, components, donor in sites:
        # modules grafted at the same cells share one pair of index tensors (the backend reuses
        # its layout of those cells from module to module)
        key = tuple(where)
        if key not in cells_of:
            cells_of[key] = (torch.tensor([r for r, _ in where], dtype=torch.long),
                             torch.tensor([c for _, c in where], dtype=torch.long))
        rows, cols = cells_of[key]
        features = None if site.features is None else torch.tensor(site.features, dtype=torch.long)
        modules.append(ModuleGraft(site.path, components, site.layer, rows, cols, features,
                                   site.token_axis, donor))
    return GraftPlan(modules, len(prompts), width, derived)


def _check_donor_conflicts(chosen, specs) -> None:
    donors_at: dict[tuple[str, int | None, int, int], str] = {}
    for (component, layer, donor), cells in chosen.items():
        for row, col in cells:
            other = donors_at.setdefault((component, layer, row, col), donor)
            if other != donor:
                where = f"layer {layer}" if layer is not None else "(global)"
                raise SpecError(
                    f"spec {specs[row].name!r}: component {component!r} at {where}, token {col} of "
                    f"row {row} is grafted from two donors ({other!r} and {donor!r}); each "
                    "(component, layer, position) may come from one donor only"
                )


def _uses_other(spec: GraftSpec) -> bool:
    return any(isinstance(s, Other) for rule in spec.rules for s in rule.positions)


def _sites(chosen, adapter: Adapter, config, merge_mlp):
    """(site, cells, components) for each module to graft. A fused QKV grafted whole at the same
    cells runs as one module, and so does an MLP with ``merge_mlp``."""
    cells = {key: sorted(set(value)) for key, value in chosen.items() if value}
    sites: list[tuple[Site, list[tuple[int, int]], tuple[str, ...]]] = []
    mlp_members = [c for c in ("gate", "up", "down") if c in adapter.components]
    done: set[tuple[str, int | None]] = set()
    for (component, layer), where in cells.items():
        if (component, layer) in done:
            continue
        fused = adapter.fused_with(component)
        shared = [(c, layer) for c in fused] if fused else []
        if shared and all(cells.get(m) == where for m in shared):
            done.update(shared)  # the whole fused projection: no feature slicing needed
            path = adapter.sites(fused[0], layer, config)[0].path
            sites.append((Site(fused[0], path, layer), where, fused))
            continue
        members = [(c, layer) for c in mlp_members]
        if (merge_mlp and adapter.mlp_path and component in mlp_members
                and all(cells.get(m) == where for m in members)):
            done.update(members)  # the whole MLP is position-wise: graft it as one module
            path = f"{adapter.layers_path}.{layer}.{adapter.mlp_path}"
            sites.append((Site("mlp", path, layer), where, tuple(mlp_members)))
            continue
        done.add((component, layer))
        for site in adapter.sites(component, layer, config):
            sites.append((site, where, (component,)))
    return sites


def _forward_rank(site: Site, adapter: Adapter, n_layers: int) -> tuple[int, int]:
    if site.component == "mlp":  # a collapsed MLP runs where its first projection would
        first = next(c for c in ("gate", "up", "down") if c in adapter.components)
        return adapter.site_order(adapter.sites(first, site.layer, None)[0], n_layers)
    return adapter.site_order(site, n_layers)
