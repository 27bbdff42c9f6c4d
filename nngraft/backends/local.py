"""Run a :class:`~nngraft.plan.GraftPlan` in one nnsight trace of the recipient.

For each grafted module, in forward order::

    x   = module.input                      # what P's module receives (the grafted run's own state)
    y   = module(x[rows, cols]) with F's parameters swapped in
    out = module.output.clone(); out[rows, cols(, features)] = y
    module.output = out

Only the grafted positions are sent through the donor (gather → donor → scatter), so a graft at
the last token costs one token's worth of work per module.

Why one pass is exact: every weighted operation in a transformer acts on each position separately,
and the only cross-position operation, attention's mixing, has no weights. So the output of a
module at position ``t`` depends only on its input at ``t`` and on the weights active at ``t``;
keys and values written at ``t`` are read unchanged by later positions — exactly what processing
token by token with F's weights swapped in (and a KV cache) produces. Attention grafts replace the
q/k/v/o *projections*, so P's KV cache is never touched by the donor.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from ..donor import Donor
from ..errors import DonorMismatchError
from ..plan import GraftPlan, ModuleGraft


@contextmanager
def swapped_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run ``module`` with ``params`` in place of its own (restored on exit, always)."""
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - very old or very new torch
        _reparametrize_module = None
    if _reparametrize_module is not None:
        with _reparametrize_module(module, params):
            yield
        return
    saved = {}  # pragma: no cover - fallback path
    try:  # pragma: no cover
        for name, value in params.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            saved[name] = (owner, leaf, owner._parameters[leaf])
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        yield
    finally:  # pragma: no cover
        for owner, leaf, value in saved.values():
            owner._parameters[leaf] = value


def envoy_at(root: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module path (``model.layers.3.mlp``)."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_plan(root: Any, plan: GraftPlan, donors: Donor | Mapping[str, Donor]) -> None:
    """Inside an open trace of ``root``: apply every module graft of ``plan``, in order.

    ``donors`` is one donor, or donors by name (``{"default": F, "hybrid": H}``) for plans whose
    rules name them."""
    if not isinstance(donors, Mapping):
        donors = {"default": donors}
    for path, grafts in plan.by_path():
        envoy = envoy_at(root, path)
        module = envoy._module
        axis = grafts[0].token_axis
        x = envoy.input
        out = envoy.output
        if axis != 1:
            x, view = x.movedim(axis, 1), out.movedim(axis, 1)
        else:
            view = out
        # The module's output is a fresh tensor that nothing has read yet: write into it in place.
        for name, mine in _by_donor(grafts):
            params = _donor(donors, name).params(path, module)
            if len(mine) == 1:
                rows, cols = mine[0].rows, mine[0].cols
            else:  # fused q/k/v at different positions: one donor call on the union
                cells = torch.unique(torch.stack([torch.cat([g.rows for g in mine]),
                                                  torch.cat([g.cols for g in mine])]), dim=1)
                rows, cols = cells[0], cells[1]
            y = donor_forward(envoy, module, params, x[rows, cols])
            for graft in mine:
                part = y if len(mine) == 1 else y[_positions_in(rows, cols, graft.rows, graft.cols, plan.seq_len)]
                if graft.features is None:
                    view[graft.rows, graft.cols] = part
                else:
                    block = view[graft.rows, graft.cols]
                    block[..., graft.features] = part[..., graft.features]
                    view[graft.rows, graft.cols] = block


def donor_forward(envoy: Any, module: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """P's ``module`` applied to ``x`` with the donor's ``params``.

    Linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are computed directly; any other module is
    run as itself with the parameters swapped in (called through its envoy, which nnsight allows
    inside a trace without disturbing the forward pass being traced)."""
    kind = type(module)
    if kind is torch.nn.Linear:
        return torch.nn.functional.linear(x, params["weight"], params.get("bias"))
    if kind.__name__ == "Conv1D" and set(params) == {"weight", "bias"}:  # GPT-2: weight is (in, out)
        return torch.addmm(params["bias"], x.reshape(-1, x.shape[-1]), params["weight"]).view(*x.shape[:-1], -1)
    with swapped_parameters(module, params):
        return envoy(x)


def _by_donor(grafts: list[ModuleGraft]) -> list[tuple[str, list[ModuleGraft]]]:
    groups: dict[str, list[ModuleGraft]] = {}
    for graft in grafts:
        groups.setdefault(graft.donor, []).append(graft)
    return list(groups.items())


def _donor(donors: Mapping[str, Donor], name: str) -> Donor:
    try:
        return donors[name]
    except KeyError:
        raise DonorMismatchError(
            f"a rule grafts from donor {name!r}, but this run has donors {sorted(donors)}; pass it "
            f"with Grafter(P, F, tokenizer, donors={{{name!r}: ...}})"
        ) from None


def _positions_in(rows, cols, sub_rows, sub_cols, width) -> torch.Tensor:
    """Indices of the cells (sub_rows, sub_cols) inside the sorted cells (rows, cols)."""
    keys = rows * width + cols
    return torch.searchsorted(keys, sub_rows * width + sub_cols)
