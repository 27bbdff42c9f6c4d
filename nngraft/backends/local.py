"""The local backend: run a :class:`~nngraft.compile.plan.GraftPlan` in one nnsight trace of the recipient.

:class:`LocalBackend` loads P and the donors in this process and runs each forward pass as a
plain call (empty plan) or one nnsight trace in which :func:`apply_plan` — the one place where a
graft is applied to P's modules — replaces P's modules at the grafted cells.

For each grafted module, in forward order::

    x    = module.input                      # what P's module receives (the grafted run's own state)
    y[g] = module(x[g]) with F's parameters  # g: the grafted cells (batch row, token)
    y[r] = module(x[r]) with P's own         # r: every other cell
    module.skip(y)                           # y replaces P's call: P's module does not run

A graft *replaces* computation instead of adding it: P's module never processes a grafted cell
(and is not called at all when every cell is grafted), so a grafted forward costs the matmul
FLOPs of a plain one. A fused projection grafted on some output features (``q`` of GPT-2's
``c_attn``) computes its grafted cells in one call whose weight rows are F's for those features
and P's for the others.

Why one pass is exact: every weighted operation in a transformer acts on each position separately,
and the only cross-position operation, attention's mixing, has no weights. So the output of a
module at position ``t`` depends only on its input at ``t`` and on the weights active at ``t``;
keys and values written at ``t`` are read unchanged by later positions — exactly what processing
token by token with F's weights swapped in (and a KV cache) produces. Attention grafts replace the
q/k/v/o *projections*, so P's KV cache is never touched by the donor.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Iterator, Mapping

import torch

from ..arch.kinds import CONV1D, LINEAR, direct, feature_axes
from ..compile.plan import GraftPlan, ModuleGraft
from ..compile.tokens import PaddedBatch, TokenizedPrompt
from ..compile.trace import CompiledGraft
from ..donors.donor import Donor, pick_donor
from .base import Backend
from .functional import check_input_ids
from .setup import Setup


class LocalBackend(Backend):
    """Every forward pass in this process, on the set-up's P and donors (the default backend).

    An empty plan is a plain call of P; otherwise one nnsight trace applies the plan
    (:func:`apply_plan`). Keeps a KV cache when asked (prefix sharing, generation). Passes are
    serialized with the set-up's lock, so one Grafter may be used from several threads. P's
    weights are never modified: donor parameters are swapped in only for the duration of each
    donor call.
    """

    supports_cache = True

    @property
    def scratch(self) -> "Scratch":
        """Grafts' scratch buffers, kept from pass to pass (see :class:`Scratch`)."""
        if "_scratch" not in self.__dict__:
            self._scratch = Scratch()
        return self._scratch

    def __call__(self, setup: Setup, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False,
                 cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of P with ``plan`` applied. Returns (logits, KV cache or None)."""
        kwargs: dict[str, Any] = dict(batch.model_inputs(), use_cache=use_cache or cache is not None)
        if cache is not None:
            kwargs[setup.cache_keyword] = cache
        if setup.keeps_last and not keep_all:
            kwargs["logits_to_keep"] = 1
            plan = plan.lm_head_on_last_column(setup.adapter.lm_head)
        with torch.no_grad(), setup.lock:
            if plan.is_empty:
                out = setup.model(**kwargs)
            else:
                donors = setup.donors_for(plan)
                with setup.envoy.trace(**kwargs):
                    apply_plan(setup.envoy, plan, donors, self.scratch)
                    out = setup.envoy.output.save()
        if not kwargs["use_cache"]:
            return out.logits, None
        cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5 renamed it
        return out.logits, cache

    # -- inside nnsight traces (nngraft.compile.trace) ----------------------------------------------

    def compile_graft(self, setup: Setup, plan: GraftPlan, batch: PaddedBatch, prompts: list[TokenizedPrompt],
                      spec_names: list[str]) -> CompiledGraft:
        import weakref

        return CompiledGraft(plan, batch.model_inputs(), prompts, setup.model.config.model_type,
                             setup.adapter.n_layers(setup.model.config), donors=setup.donors_for(plan),
                             spec_names=spec_names, applier=apply_compiled, recipient=weakref.ref(setup.model))

    def open_trace(self, setup: Setup, compiled: CompiledGraft, **kwargs: Any) -> Any:
        """A trace of P whose first intervention block is the graft: an nnsight edit of P's envoy
        (a copy sharing its modules), so the graft runs ahead of the trace's own code."""
        kwargs.setdefault("use_cache", False)
        with setup.envoy.edit() as (_, edited):
            compiled.apply(edited)
        return edited.trace(**compiled.inputs, **kwargs)


def apply_compiled(root: Any, compiled: CompiledGraft) -> None:
    """Inside an open trace of ``root``: check the batch is the compiled one, then apply every
    module graft (:func:`apply_plan`)."""
    check_input_ids(root, compiled.input_ids)
    apply_plan(root, compiled.plan, compiled.donors, after_user_edits=True)


@contextmanager
def swapped_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run ``module`` with ``params`` in place of its own (restored on exit, always).

    The tensors are put straight into the owning modules' parameter tables (no copy, no
    ``nn.Parameter`` wrapping): a module's forward reads ``self.weight`` from there."""
    saved = []
    try:
        for name, value in params.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        yield
    finally:
        for owner, leaf, value in reversed(saved):
            owner._parameters[leaf] = value


def envoy_at(root: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module path (``model.layers.3.mlp``)."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_plan(root: Any, plan: GraftPlan, donors: Donor | Mapping[str, Donor],
               scratch: "Scratch | None" = None, *, after_user_edits: bool = False) -> None:
    """Inside an open trace of ``root``: apply every module graft of ``plan``, in order.

    Each grafted module is *replaced*, not run and overwritten: its input is split into the
    grafted cells (computed with the donor's parameters) and the rest (computed with P's), and
    the combined output is handed on with ``envoy.skip`` in place of P's own call — so P's
    module never processes a grafted cell, and is not called at all when every cell is grafted.

    ``donors`` is one donor, or donors by name (``{"default": F, "hybrid": H}``) for plans whose
    rules name them. ``scratch``: buffers to reuse (a backend keeps one :class:`Scratch` for all
    its passes, made under its lock); a fresh one by default.

    ``after_user_edits`` (grafts inside a user's trace, :mod:`nngraft.compile.trace`): P's module
    runs, and the graft computes its output from the module's input *after* the user's blocks have
    seen it, so an in-place edit of a grafted module's input (``m.input[:, -1] *= 0``) reaches the
    graft, as on the NDIF backend (:func:`nngraft.backends.functional.apply_op`); the grafted cells
    are then written over P's output, and every other cell keeps the module's own output. It costs
    the grafted modules' P call, which the plain (skip) path saves."""
    if not isinstance(donors, Mapping):
        donors = {"default": donors}
    layouts = Layouts(scratch)
    for path, grafts in plan.by_path():
        envoy = envoy_at(root, path)
        params = [pick_donor(donors, g.donor).params(path, envoy._module) for g in grafts]
        if not after_user_edits:
            envoy.skip(replaced_output(envoy, envoy.input, grafts, params, layouts))
            continue
        x = envoy.input
        own = envoy.output  # the module ran on its input as the user's blocks left it
        grafted = replaced_output(envoy, x, grafts, params, layouts)
        axis = grafts[0].token_axis
        merged = (own.movedim(axis, 1) if axis != 1 else own).clone()
        source = grafted.movedim(axis, 1) if axis != 1 else grafted
        for g in grafts:
            rows, cols = g.rows.to(merged.device), g.cols.to(merged.device)
            merged[rows, cols] = source[rows, cols]
        envoy.output = merged.movedim(1, axis).contiguous() if axis != 1 else merged


def replaced_output(envoy: Any, x: torch.Tensor, grafts: list[ModuleGraft],
                    params: list[dict[str, torch.Tensor]], layouts: "Layouts | None" = None) -> torch.Tensor:
    """The output of ``envoy``'s module on input ``x`` with ``grafts`` applied, each cell computed
    once: a cell that a graft covers entirely by the donor (``params[i]`` for ``grafts[i]``), a
    cell where some output features are grafted (a fused q/k/v slice) by one call with P's and the
    donors' parameters combined feature by feature, every other cell by P's own parameters.

    Cells (batch, token — after moving the graft's token axis to dimension 1) are gathered once
    into groups, each group is computed on a contiguous slice, and one gather puts the output
    rows back in cell order (a projection computed without autograd writes its groups into one
    scratch buffer, read back with one gather; any other module's groups are scattered into its
    output)."""
    module = envoy._module
    x = on_module_device(module, x)
    axis = grafts[0].token_axis
    xt = x.movedim(axis, 1) if axis != 1 else x
    batch, width = xt.shape[0], xt.shape[1]
    flat = xt.reshape(batch * width, *xt.shape[2:])
    layouts = layouts or Layouts()
    layout = layouts.get(grafts, batch * width, width, flat.device)
    values = []
    for which in layout.donors:
        if which is None:
            values.append(None)  # P's own parameters
        elif len(which) == 1 and grafts[which[0]].features is None:
            values.append(params[which[0]])
        else:
            values.append(_feature_mix(module, [(grafts[i].features, params[i]) for i in which]))
    if len(values) == 1:  # one computation covers every cell
        out = module_forward(envoy, module, values[0], flat)
    else:
        ordered = layouts.gathered(x, flat, layout)
        parts = zip(layout.bounds, values)
        features = projection_width(module)
        if features is not None and not torch.is_grad_enabled():
            grouped = layouts.buffer((ordered.shape[0], features), ordered)
            for (start, stop), value in parts:
                project_into(module, value, ordered[start:stop], grouped[start:stop])
            out = grouped.index_select(0, layout.inverse)
        else:
            out = None
            for (start, stop), value in parts:
                y = module_forward(envoy, module, value, ordered[start:stop])
                if out is None:
                    out = y.new_empty((flat.shape[0], *y.shape[1:]))
                out.index_copy_(0, layout.order[start:stop], y)
    out = out.view(batch, width, *out.shape[1:])
    return out.movedim(1, axis).contiguous() if axis != 1 else out


def on_module_device(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of ``module``'s weights. A graft replaces the module's call, and with
    it the hook that a model split over devices (accelerate's ``device_map``) runs first to move
    the input to the module's device: the input may still be on the previous module's device."""
    weight = next(module.parameters(), None)
    if weight is None or weight.device == x.device or weight.is_meta:
        return x
    return x.to(weight.device)


@dataclass
class Layout:
    """How a module's (batch × tokens) cells are split among computations: ``order`` lists every
    cell once, group by group; group ``i`` is ``order[bounds[i][0]:bounds[i][1]]`` and computed
    with the grafts ``donors[i]`` (indices into the module's grafts; ``None``: no graft, P's own
    parameters); ``inverse`` puts rows in ``order`` back in cell order."""

    order: torch.Tensor
    inverse: torch.Tensor
    bounds: list[tuple[int, int]]
    donors: list[tuple[int, ...] | None]


class Scratch:
    """Scratch tensors for grafts (gathered inputs, projections' grouped outputs), one per role
    and row width, grown to the most rows asked for and reused from module to module and from
    pass to pass. A pass that allocated and freed them anew spent more in the allocator than in
    the copies: on SmolLM2, freeing a few MB each pass let the C allocator hand memory back to the
    system, and the page faults of getting it back cost several percent of a grafted forward.
    Memory held: about one layer's activations of the largest batch grafted."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], like: torch.Tensor, role: str) -> torch.Tensor:
        """A tensor of ``shape`` (``like``'s dtype and device) whose contents are garbage and
        live until the next ``get`` of the same role and width."""
        key = (role, tuple(shape[1:]), like.dtype, like.device)
        held = self._buffers.get(key)
        if held is None or held.shape[0] < shape[0]:
            held = self._buffers[key] = like.new_empty(shape)
        return held[:shape[0]]


class Layouts:
    """The layouts and gathered inputs of one forward pass, shared by the modules that can share
    them, and its scratch buffers (:class:`Scratch`).

    Consecutive modules usually graft the same cells (q, k, v, o of every layer at an entity), so
    the last layout is reused when the cells are equal (the same index tensors, as compiled plans
    share them, or equal ones). Likewise the gathered input is reused by the next module that
    receives the very same input tensor with the same layout (q, k and v of a layer all read the
    normed hidden states): one gather instead of three."""

    def __init__(self, scratch: Scratch | None = None) -> None:
        self._last: tuple[list[ModuleGraft], int, int, Layout] | None = None
        self._inputs: tuple[torch.Tensor, int, Layout, torch.Tensor] | None = None
        self._scratch = scratch if scratch is not None else Scratch()

    def gathered(self, x: torch.Tensor, flat: torch.Tensor, layout: Layout) -> torch.Tensor:
        """``flat``'s rows in ``layout.order`` (``flat`` is ``x`` flattened to cells)."""
        held = self._inputs
        if held is not None and held[0] is x and held[1] == x._version and held[2] is layout:
            return held[3]  # the same tensor, not modified in place since (its version counter)
        if torch.is_grad_enabled():
            rows = flat.index_select(0, layout.order)
        else:
            rows = torch.index_select(flat, 0, layout.order, out=self.buffer(
                (layout.order.numel(), *flat.shape[1:]), flat, role="input"))
        self._inputs = (x, x._version, layout, rows)  # holding x keeps its identity from being reused
        return rows

    def buffer(self, shape: tuple[int, ...], like: torch.Tensor, role: str = "output") -> torch.Tensor:
        """A scratch tensor of ``shape`` (``like``'s dtype and device): its contents live only
        until the next module of this pass needs it."""
        return self._scratch.get(shape, like, role)

    def get(self, grafts: list[ModuleGraft], n_cells: int, width: int, device: Any) -> Layout:
        last = self._last
        if (last is not None and last[1] == n_cells and last[2] == width and len(last[0]) == len(grafts)
                and last[3].order.device == torch.device(device)  # a model split over devices
                and all(_same_cells(a, b) for a, b in zip(last[0], grafts))):
            return last[3]
        layout = _layout(grafts, n_cells, width, device)
        self._last = (grafts, n_cells, width, layout)
        return layout


def _same_cells(a: ModuleGraft, b: ModuleGraft) -> bool:
    if a is b or (a.rows is b.rows and a.cols is b.cols and a.features is b.features):
        return True
    if (a.features is None) != (b.features is None) or a.rows.shape != b.rows.shape:
        return False
    return (torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
            and (a.features is None or torch.equal(a.features, b.features)))


def _layout(grafts: list[ModuleGraft], n_cells: int, width: int, device: Any) -> Layout:
    keys = [(g.rows * width + g.cols).to(device) for g in grafts]
    if len(grafts) == 1:
        groups: list[tuple[torch.Tensor, tuple[int, ...] | None]] = [(torch.unique(keys[0]), (0,))]
    else:  # cells grouped by the set of grafts covering them
        code = torch.zeros(n_cells, dtype=torch.long, device=device)
        for i, k in enumerate(keys):
            code[k] |= 1 << i
        groups = []
        for value in torch.unique(code).tolist():
            if value:
                which = tuple(i for i in range(len(grafts)) if value >> i & 1)
                whole = [i for i in which if grafts[i].features is None]
                groups.append(((code == value).nonzero().squeeze(1), (whole[0],) if whole else which))
    untouched = torch.ones(n_cells, dtype=torch.bool, device=device)
    for cells, _ in groups:
        untouched[cells] = False
    rest = untouched.nonzero().squeeze(1)
    if rest.numel():
        groups.append((rest, None))
    order = torch.cat([cells for cells, _ in groups]) if len(groups) > 1 else groups[0][0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    stops = list(accumulate(int(cells.numel()) for cells, _ in groups))
    return Layout(order, inverse, list(zip([0, *stops[:-1]], stops)), [which for _, which in groups])


def _feature_mix(module, parts) -> dict[str, torch.Tensor]:
    """P's parameters with the given output features replaced by each donor's (Linear weight is
    (out, in); GPT-2's Conv1D stores (in, out); biases are (out,))."""
    out_dim = feature_axes(module)
    mixed = {}
    for name, mine in module.named_parameters():
        value = mine.detach().clone()
        for features, donor in parts:
            dim = out_dim[name]
            value.index_copy_(dim, features.to(value.device), donor[name].index_select(dim, features.to(value.device)))
        mixed[name] = value
    return mixed


def projection_width(module: torch.nn.Module) -> int | None:
    """Output features of a projection computed directly (``nn.Linear``, GPT-2's ``Conv1D``);
    ``None`` for any other module (it runs as itself)."""
    kind = direct(module)
    return kind.out_features(module) if kind is not None else None


def project_into(module: torch.nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
                 out: torch.Tensor) -> None:
    """Write the projection ``module`` (see :func:`projection_width`) of 2-d ``x`` into ``out``,
    with ``params`` in place of its own (``None``: its own). The same matmul as the module's call
    (``F.linear`` is ``addmm(bias, x, W.T)``; GPT-2's ``Conv1D`` is ``addmm(bias, x, W)``)."""
    weight = module.weight if params is None else params["weight"]
    bias = module.bias if params is None else params.get("bias")
    if not direct(module).transposed:  # addmm wants (in, out)
        weight = weight.t()
    if bias is None:
        torch.mm(x, weight, out=out)
    else:
        torch.addmm(bias, x, weight, out=out)


def module_forward(envoy: Any, module: torch.nn.Module, params: dict[str, torch.Tensor] | None,
                   x: torch.Tensor) -> torch.Tensor:
    """P's ``module`` applied to ``x``, with ``params`` in place of its own (``None``: its own).

    Linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are computed directly; any other module is
    run as itself, with the parameters swapped in (called through its envoy, which nnsight allows
    inside a trace without disturbing the forward pass being traced)."""
    kind = direct(module)
    if params is None:
        if kind is LINEAR:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        if kind is not CONV1D:
            return envoy(x)
        params = {"weight": module.weight, "bias": module.bias}
    if kind is LINEAR:
        return torch.nn.functional.linear(x, params["weight"], params.get("bias"))
    if kind is CONV1D and set(params) == {"weight", "bias"}:  # GPT-2: x @ W + b
        return torch.addmm(params["bias"], x.reshape(-1, x.shape[-1]), params["weight"]).view(*x.shape[:-1], -1)
    with swapped_parameters(module, params):
        return envoy(x)
