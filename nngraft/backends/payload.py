"""What a remote request carries: module kinds, programs, and payload sizes.

A spec compiles to a :class:`~nngraft.compile.plan.GraftPlan` as for a local run; here the plan becomes a
*program* — plain data plus the donor's tensors, one op per grafted leaf module — that
:func:`nngraft.backends.functional.run_program` executes inside the remote trace. On the way:

- :func:`module_kind` decides which functional formula computes each grafted module, and checks
  it reproduces the module's own forward bit for bit;
- :func:`leaf_plan` turns whole-MLP grafts into one graft per projection (the same function);
- :func:`build_program` asks each donor for its :class:`~nngraft.donors.delta.Shipment` per module and
  reports what travels (:class:`PayloadReport`);
- :func:`estimate_payload` gives the same sizes from shapes only, before anything is computed
  (also for :class:`ShapeDonor`, a donor known only by its form: ``dense``, ``delta:64``,
  ``lora:16``).

Example:
    >>> format_bytes(7_077_888)
    '7.1 MB'
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..arch import Adapter, adapter_for, get_module
from ..arch.kinds import CONV1D, EMBEDDING, LINEAR, NORM, kind_of
from ..donors.delta import RemoteDonor, Shipment, detached_copy, layout_of, to_map
from ..errors import PayloadTooLargeError, RemoteGraftError, UnsupportedModuleError
from .functional import INPUT_IDS_SLOT, PROGRAM_VERSION, forward as functional_forward
from ..donors.donor import pick_donor
from ..donors.partial import PartialDonor
from ..compile.plan import GraftPlan, rule_targets
from .traffic import REQUEST_INPUT_IDS, Dataflow, dataflow, plan_ops

# ---------------------------------------------------------------------------------------------
# Module kinds: which functional formula reproduces a module's forward
# ---------------------------------------------------------------------------------------------

_KIND_CACHE: dict[tuple, bool] = {}


def _probe(module: torch.nn.Module, kind: str, const: dict, make_input: Callable[[torch.dtype], Any]) -> bool:
    """Does ``functional.forward(kind)`` reproduce ``module``'s forward bit for bit, in float32 and
    bfloat16? Runs on a CPU copy with random parameters (meta modules are materialised first)."""
    key = (type(module), kind, tuple(sorted((k, str(v)) for k, v in const.items())),
           tuple(tuple(p.shape) for p in module.parameters()))
    if key in _KIND_CACHE:
        return _KIND_CACHE[key]
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module)
    probe = probe.to_empty(device="cpu") if any(p.is_meta for p in probe.parameters()) else probe.cpu()
    ok = True
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
        for dtype in (torch.float32, torch.bfloat16):
            probe.to(dtype)
            x = make_input(dtype)
            params = dict(probe.named_parameters())
            try:
                ok = torch.equal(probe(x), functional_forward(kind, x, params, const))
            except Exception:  # noqa: BLE001 - a formula that does not apply is just "no"
                ok = False
            if not ok:
                break
    _KIND_CACHE[key] = ok
    return ok


def module_kind(module: torch.nn.Module, path: str = "") -> tuple[str, dict[str, Any]]:
    """The :mod:`nngraft.backends.functional` kind of ``module`` and the constants its formula needs.

    ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding`` and ``nn.LayerNorm`` are recognised by class
    (when they do not override ``forward``); scaled embeddings and RMS norms are matched by
    running candidate formulas against the module's own forward on random inputs and requiring
    bitwise equality in float32 and bfloat16. Raises :class:`UnsupportedModuleError` otherwise.

    Example:
        >>> module_kind(torch.nn.LayerNorm(8))
        ('layer_norm', {'eps': 1e-05, 'shape': [8]})
    """
    cls = type(module)
    kind = kind_of(module)
    if kind is LINEAR and cls.forward is torch.nn.Linear.forward:
        return "linear", {}
    if kind is CONV1D:
        from transformers.pytorch_utils import Conv1D

        if cls.forward is Conv1D.forward:
            return "conv1d", {}
    if kind is EMBEDDING:
        if cls.forward is torch.nn.Embedding.forward and module.max_norm is None:
            return "embedding", {}
        scale = getattr(module, "scalar_embed_scale", None)
        if scale is not None:
            const = {"scale": float(scale)}
            n = module.num_embeddings
            ids = lambda dtype: torch.arange(min(n, 64)) % n  # noqa: E731
            if _probe(module, "embedding", const, ids):
                return "embedding", const
    if kind is NORM and isinstance(module, torch.nn.LayerNorm) and cls.forward is torch.nn.LayerNorm.forward:
        return "layer_norm", {"eps": float(module.eps), "shape": list(module.normalized_shape)}
    params = dict(module.named_parameters())
    if set(params) == {"weight"} and params["weight"].ndim == 1:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if isinstance(eps, (int, float)):
            d = params["weight"].shape[0]
            x = lambda dtype: (3 * torch.randn(2, 3, d, generator=torch.Generator().manual_seed(1))).to(dtype)  # noqa: E731
            for form in NORM.functional:  # the RMS forms: which one is probed, bit for bit
                if form.startswith("rms_") and _probe(module, form, {"eps": float(eps)}, x):
                    return form, {"eps": float(eps)}
    raise UnsupportedModuleError(
        f"cannot graft {path or 'a module'} ({cls.__name__}) remotely: nngraft has no functional form "
        "that reproduces its forward exactly (supported: Linear, GPT-2 Conv1D, Embedding incl. "
        "Gemma's scaled one, LayerNorm, and Llama/OLMo-2/Gemma-style RMSNorm)"
    )


# ---------------------------------------------------------------------------------------------
# Plans → programs
# ---------------------------------------------------------------------------------------------


def leaf_plan(plan: GraftPlan, adapter: Adapter, config: Any) -> GraftPlan:
    """The same grafts on leaf modules only: a whole-MLP graft (one module call locally) becomes
    one graft per projection at the same cells — the same function, since an MLP is position-wise
    and its projections are its only weights."""
    modules = []
    n_layers = adapter.n_layers(config)
    for graft in plan.modules:
        fused = set(graft.components) <= set(adapter.fused_with(graft.components[0]))
        if len(graft.components) > 1 and not fused:
            sites = [s for c in graft.components for s in adapter.sites(c, graft.layer, config)]
            sites.sort(key=lambda s: adapter.site_order(s, n_layers))
            for site in sites:
                modules.append(dataclasses.replace(graft, path=site.path, components=(site.component,),
                                                   features=None, token_axis=site.token_axis))
        else:
            modules.append(graft)
    return dataclasses.replace(plan, modules=modules)


@dataclass
class PayloadItem:
    """One grafted module's share of a request."""

    path: str
    mode: str  # replace / correct / skip
    kind: str
    bytes: int


@dataclass
class PayloadReport:
    """What a request carries (donor tensors per module) and whether it fits the limit."""

    items: list[PayloadItem] = field(default_factory=list)
    donor: str = ""
    dtype: str = ""
    limit_bytes: int | None = None
    exact: bool = False  # True once measured on the serialized request

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def skipped(self) -> list[str]:
        return [i.path for i in self.items if i.mode == "skip"]

    def summary(self) -> str:
        sent = [i for i in self.items if i.mode != "skip"]
        text = (f"{len(sent)} module(s), {format_bytes(self.total_bytes)} of donor tensors "
                f"({self.donor}, {self.dtype})")
        if self.skipped:
            text += f"; {len(self.skipped)} grafted module(s) unchanged by the donor (skipped)"
        return text

    def table(self) -> str:
        """One line per module: path, mode (replace/correct/skip, or send for an estimate), module
        kind (once known) and bytes."""
        width = max([len(i.path) for i in self.items] + [6])
        kinds = any(i.kind for i in self.items)
        def line(path: str, mode: str, kind: str, size: str) -> str:
            return f"{path:<{width}}  {mode:<8} " + (f"{kind:<10} " if kinds else "") + f"{size:>10}"
        lines = [line("module", "mode", "kind", "bytes")]
        lines += [line(i.path, i.mode, i.kind, format_bytes(i.bytes)) for i in self.items]
        lines.append(line("total", "", "", format_bytes(self.total_bytes)))
        return "\n".join(lines)

    def check(self, size: int | None = None) -> None:
        """Raise :class:`PayloadTooLargeError` if ``size`` (default: the tensor total) is over the limit."""
        size = self.total_bytes if size is None else size
        if self.limit_bytes is not None and size > self.limit_bytes:
            raise PayloadTooLargeError(
                f"this request would send {format_bytes(size)} ({self.summary()}), over the limit of "
                f"{format_bytes(self.limit_bytes)}. Send less: a DeltaDonor with rank=... or a LoRA "
                "adapter instead of dense tensors, dtype=torch.bfloat16, fewer modules or layers per "
                "spec, or raise max_payload_mb= (NNGRAFT_MAX_PAYLOAD_MB) if you are sure."
            )


def format_bytes(n: float) -> str:
    """``format_bytes(3_500_000)`` → ``'3.5 MB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "as stored"


def _dtype_label(donors: Mapping[str, Any], dtype: torch.dtype | None) -> str:
    return ", ".join(sorted({dtype_name(getattr(d, "dtype", None) or dtype) for d in donors.values()}))


def _cells(grafts: Sequence[Any], width: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    if len(grafts) == 1:
        return grafts[0].rows, grafts[0].cols, [None]
    cells = torch.unique(torch.stack([torch.cat([g.rows for g in grafts]),
                                      torch.cat([g.cols for g in grafts])]), dim=1)
    rows, cols = cells[0], cells[1]
    keys = rows * width + cols
    return rows, cols, [torch.searchsorted(keys, g.rows * width + g.cols) for g in grafts]


def donor_name_of(graft: Any) -> str:
    return getattr(graft, "donor", None) or "default"


def build_program(plan: GraftPlan, model: torch.nn.Module, adapter: Adapter,
                  donors: RemoteDonor | Mapping[str, RemoteDonor],
                  dtype: torch.dtype | None, *, keep_last: bool = True) -> tuple[dict, PayloadReport]:
    """Turn a plan into a program (plain data + tensors) and report what it carries.

    ``donors``: one donor, or donors by name for specs whose rules name them (``"donor": NAME``).
    Each op also says where its module's input comes from (read, or a value an earlier op holds)
    and whether its output is edited in place (:func:`nngraft.backends.traffic.plan_ops`); ``keep_last``:
    whether the request asks for the last position's logits only. A program whose first op takes
    the request's ``input_ids`` needs them set in ``program["input_ids"]`` before it runs."""
    if not isinstance(donors, Mapping):
        donors = {"default": donors}
    plan = leaf_plan(plan, adapter, model.config)
    ops: list[dict] = []
    report = PayloadReport(donor=", ".join(d.describe() for d in donors.values()),
                           dtype=_dtype_label(donors, dtype))
    for path, grafts in plan.by_path():
        module = get_module(model, path)
        sources = []
        kind, const = None, {}
        for name in dict.fromkeys(donor_name_of(g) for g in grafts):
            mine = [g for g in grafts if donor_name_of(g) == name]
            shipment = pick_donor(donors, name).shipment(path, module, dtype)
            label = path if name == "default" else f"{path} ({name.split('~')[0]}{', part' if '~' in name else ''})"
            if shipment.mode == "skip":
                report.items.append(PayloadItem(label, "skip", "-", 0))
                continue
            if kind is None:
                kind, const = module_kind(module, path)
            rows, cols, selects = _cells(mine, plan.seq_len)
            parts = [{"rows": g.rows.clone(), "cols": g.cols.clone(), "select": s,
                      "features": None if g.features is None else g.features.clone()}
                     for g, s in zip(mine, selects)]
            sources.append({"mode": shipment.mode, "tensors": shipment.tensors, "const": dict(shipment.const),
                            "rows": rows.clone(), "cols": cols.clone(), "parts": parts})
            report.items.append(PayloadItem(label, shipment.mode, kind, shipment.nbytes))
        if sources:
            ops.append({"path": path, "kind": kind, "const": const, "axis": int(grafts[0].token_axis),
                        "sources": sources})
    if ops:  # held values travel as small ints: -1 the request's input_ids, 2i / 2i+1 op i's input / output
        try:
            flow = dataflow(model, keep_last=keep_last)
        except Exception:  # noqa: BLE001 - a model a weightless forward cannot run: read every input
            flow = Dataflow({}, {}, {})
        slot = {REQUEST_INPUT_IDS: INPUT_IDS_SLOT}
        for i, op in enumerate(ops):
            slot[f"{op['path']}.input"], slot[f"{op['path']}.output"] = 2 * i, 2 * i + 1
        for op, access in zip(ops, plan_ops([op["path"] for op in ops], flow)):
            op.update(input=None if access["input"] is None else slot[access["input"]],
                      in_place=access["in_place"], release=[slot[name] for name in access["release"]])
    return {"version": PROGRAM_VERSION, "ops": ops}, report


def spec_modules(specs: Sequence[Any], adapter: Adapter, config: Any) -> list[tuple[str, str, dict | None]]:
    """The leaf modules a list of specs grafts (at any position), with the donor name grafting each
    and the rule's parameter-level selection (``weights``, or None), in forward order."""
    n_layers = adapter.n_layers(config)
    sites: dict[tuple[str, str, str], tuple[Any, dict | None]] = {}
    for spec in specs:
        for rule, targets in zip(spec.rules, rule_targets(spec, adapter, n_layers)):
            donor = getattr(rule, "donor", None) or "default"
            weights = getattr(rule, "weights", None)
            selection = weights.model_dump(exclude_none=True) if weights is not None else None
            for component, layer in targets:
                for site in adapter.sites(component, layer, config):
                    key = (site.path, donor, repr(sorted(selection.items())) if selection else "")
                    sites.setdefault(key, (site, selection))
    ordered = sorted(sites.items(), key=lambda item: adapter.site_order(item[1][0], n_layers))
    return [(path, donor, selection) for (path, donor, _), (_, selection) in ordered]


class _PartialShape:
    """Size of a parameter-level graft (rule ``weights``) of a donor: the selected part of ΔW travels
    dense, except ``rank`` selections, which travel as two factors per matrix."""

    def __init__(self, base: Any, selection: dict) -> None:
        self.base, self.selection, self.dtype = base, selection, getattr(base, "dtype", None)

    def describe(self) -> str:
        return f"{self.base.describe()}, part {self.selection}"

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        rank = self.selection.get("rank")
        total = 0
        for p in module.parameters():
            shape = tuple(p.shape)
            total += rank * sum(shape) if rank and len(shape) == 2 and rank * sum(shape) < p.numel() else p.numel()
        return total * torch.empty((), dtype=self.dtype or dtype).element_size()


def estimate_payload(specs: Sequence[Any], model: torch.nn.Module, donors: Any, dtype: torch.dtype | None,
                     *, adapter: Adapter | None = None, limit_bytes: int | None = None) -> PayloadReport:
    """Donor bytes a request for ``specs`` carries, computed from shapes only (``model`` may live on
    the meta device; a donor needs only ``estimate_bytes``). Checks the specs against the model's
    config on the way (unknown components, layers out of range raise SpecError).

    ``donors``: one donor, or donors by name (for rules that name theirs)."""
    adapter = adapter or adapter_for(model)
    if not isinstance(donors, Mapping):
        donors = {"default": donors}
    for donor in donors.values():
        if isinstance(donor, ShapeDonor) and donor.targets:
            donor.check_targets(model)
    report = PayloadReport(donor=", ".join(d.describe() for d in donors.values()),
                           dtype=_dtype_label(donors, dtype), limit_bytes=limit_bytes)
    for path, name, selection in spec_modules(specs, adapter, model.config):
        donor = pick_donor(donors, name)
        if selection is not None:
            donor = _PartialShape(donor, selection)
        size = donor.estimate_bytes(path, get_module(model, path), dtype or torch.float32)
        label = path if name == "default" and selection is None else f"{path} ({name}{', part' if selection else ''})"
        report.items.append(PayloadItem(label, "skip" if size == 0 else "send", "", size))
    return report


class ShapeDonor:
    """A donor known only by its form, for payload estimates without any weights.

    ``kind``: ``dense`` (F's tensors), ``delta`` (dense ΔW), ``delta:R`` (ΔW at rank R), ``lora:R``
    (a LoRA adapter of rank R on the 2-D weights of the modules named in ``targets``, default all;
    other modules are unchanged by such an adapter and are skipped).

    Example:
        >>> ShapeDonor.parse("lora:16").estimate_bytes("up", torch.nn.Linear(4096, 14336), torch.bfloat16)
        589824
    """

    def __init__(self, kind: str, rank: int | None = None, targets: Sequence[str] | None = None) -> None:
        form = ":".join([kind, *([] if rank is None else [str(rank)]), *([",".join(targets)] if targets else [])])
        if kind not in ("dense", "delta", "lora") or (kind == "lora" and rank is None) or (
                kind == "dense" and (rank is not None or targets)) or (kind == "delta" and targets):
            raise ValueError(f"unknown donor form {form!r}; give dense, delta, delta:R or lora:R[:module,module]")
        if rank is not None and rank < 1:  # rank 0 was read as "no rank": dense ΔW, or 0 bytes for LoRA
            raise ValueError(f"bad donor form {form!r}: the rank must be an integer >= 1, got {rank}")
        if targets is not None and not all(t.strip() for t in targets):
            raise ValueError(f"bad donor form {form!r}: an empty module name in the LoRA targets")
        self.kind, self.rank, self.targets, self.dtype = kind, rank, tuple(targets or ()), None

    def check_targets(self, model: torch.nn.Module) -> None:
        """Refuse LoRA targets that name no module of ``model`` (an adapter on them would change
        nothing: the estimate would be 0 bytes that "fit")."""
        known = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if getattr(getattr(module, "weight", None), "ndim", 0) == 2})
        unknown = [t for t in self.targets if t not in known]
        if unknown:
            from ..errors import ArgumentError

            raise ArgumentError(f"{self.kind}:{self.rank}:{','.join(self.targets)}: no module named "
                                f"{', '.join(map(repr, unknown))} in {getattr(model.config, 'model_type', 'the model')}; "
                                f"LoRA targets here: {', '.join(known)}")

    @classmethod
    def parse(cls, text: str) -> "ShapeDonor":
        """``dense``, ``delta``, ``delta:16``, ``lora:16``, ``lora:16:gate_proj,up_proj``."""
        parts = text.split(":")
        if len(parts) > 3:
            raise ValueError(f"bad donor form {text!r}; give dense, delta, delta:R or lora:R[:module,module]")
        try:
            rank = int(parts[1]) if len(parts) > 1 else None
        except ValueError:
            raise ValueError(f"bad donor form {text!r}: the rank must be an integer >= 1") from None
        return cls(parts[0], rank, parts[2].split(",") if len(parts) > 2 else None)

    def describe(self) -> str:
        if self.kind == "lora":
            return f"LoRA r={self.rank}" + (f" on {','.join(self.targets)}" if self.targets else "")
        if self.kind == "delta" and self.rank:
            return f"ΔW rank {self.rank}"
        return {"dense": "dense F tensors", "delta": "dense ΔW"}[self.kind]

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name, p in module.named_parameters():
            shape = tuple(p.shape)
            low = self.rank is not None and len(shape) == 2 and self.rank * sum(shape) < p.numel()
            if self.kind == "lora":
                adapted = not self.targets or path.rsplit(".", 1)[-1] in self.targets
                total += self.rank * sum(shape) if (adapted and len(shape) == 2 and name == "weight") else 0
            else:
                total += self.rank * sum(shape) if low else p.numel()
        return total * size


class RemotePartialDonor(PartialDonor):
    """A parameter-level graft (a rule's ``weights``) of a donor that travels as data: the core's
    selection (:mod:`nngraft.donors.partial`) applied on the client to the donor's ΔW; the selected
    part travels as a correction (``rank`` selections as two factors per matrix)."""

    def __init__(self, base: Any, derived: Any, recipient: torch.nn.Module, adapter: Adapter) -> None:
        if not hasattr(base, "deltas"):
            raise RemoteGraftError(f"a parameter-level graft needs a DeltaDonor or LoraDonor, not "
                                   f"{type(base).__name__}")
        super().__init__(base, derived, recipient, adapter)
        self.dtype = getattr(base, "dtype", None)

    def _deltas(self, path: str, module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # P's weights stay on the server: select from ΔW alone (then "W_P + part" is just "part")
        return {name: (torch.zeros_like(d), d) for name, d in self.base.deltas(path, module).items()}

    def shipment(self, path: str, module: torch.nn.Module, dtype: torch.dtype | None = None) -> Shipment:
        dtype = self.dtype or dtype or torch.float32
        tensors: dict[str, torch.Tensor] = {}
        if self.selection.kind == "rank":
            r = self.selection.rank
            for name, d in self.base.deltas(path, module).items():
                if d.ndim == 2 and r * sum(d.shape) < d.numel():
                    layout = layout_of(module, name)
                    u, sv, vh = torch.linalg.svd(to_map(d, layout).double(), full_matrices=False)
                    k = min(r, sv.numel())
                    norm = float(sv.norm())
                    self.errors[f"{path}.{name}"] = float(sv[k:].norm()) / norm if norm else 0.0
                    tensors[f"{name}.B"] = detached_copy((u[:, :k] * sv[:k]).float(), dtype)
                    tensors[f"{name}.A"] = detached_copy(vh[:k].float(), dtype)
                elif torch.any(d):
                    tensors[name] = detached_copy(d, dtype)
        else:
            tensors = {n: detached_copy(d, dtype) for n, d in self.params(path, module).items() if torch.any(d)}
        return Shipment("correct", tensors) if tensors else Shipment("skip")

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        return _PartialShape(self.base, self.selection.model_dump(exclude_none=True)).estimate_bytes(
            path, module, self.dtype or dtype)

    def describe(self) -> str:
        return f"{self.base.describe()}, part {self.selection.model_dump(exclude_none=True)}"
