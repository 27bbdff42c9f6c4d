"""Activation traffic of a remote request: how often it reads and writes activations, and how many
bytes that moves over NDIF's sandbox socket.

On NDIF's sandboxed path (ordinary API keys) a request's code runs in a separate process that holds
only a weightless copy of the model; the forward pass runs in the model's process. Every read of a
module's input or output carries that activation (the whole batch) to the sandbox, and since the
sandbox's copy may be edited in place, NDIF writes it back once the code moves on: **a read is two
round trips and moves its bytes twice; a write without a read (an assignment) is one**. Weights never
cross. On NDIF's trusted path the same accesses are in-process and cost nothing comparable.

A graft program (:mod:`nngraft.backends.functional`) touches, for each grafted module, its output (read and
edited in place, which the write-back carries into the model) and its input — unless the program
already holds that value: the (edited) output of an earlier grafted module (Llama's q/k/v receive
what ``input_layernorm`` returned), the input of an earlier one (q, k and v share one input; so do
gate and up), or the request's own ``input_ids`` (the token embedding). :func:`dataflow` finds
these by one forward pass of a weightless (meta) copy of the model, comparing tensor identity and
version counter, so it holds for any architecture and never assumes. An output that is not a fresh
tensor (a module returning its input) is replaced by an assignment instead of edited in place.

Example:
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> flow = dataflow(P)
    >>> flow.sources["model.layers.0.self_attn.k_proj"]  # what k_proj receives was also ...
    ('model.layers.0.input_layernorm.output', 'model.layers.0.self_attn.input', 'model.layers.0.self_attn.q_proj.input')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

REQUEST_INPUT_IDS = "input_ids"
"""The source name of the request's own token ids (the token embedding's input)."""


@dataclass(frozen=True)
class Dataflow:
    """What one forward pass of a model shows about its modules' inputs and outputs.

    ``sources[path]``: the locations (``"<path>.input"``/``"<path>.output"`` of modules that ran
    earlier, or ``"input_ids"``) holding the very tensor ``path`` receives as its first input,
    unchanged since; earliest first. ``fresh[path]``: whether ``path`` returns a new tensor (safe
    to edit in place). ``numel[location]``: ``(a, b)`` such that the tensor at ``location`` has
    ``rows * (a + b * tokens)`` elements. ``integer``: locations holding integer tensors."""

    sources: dict[str, tuple[str, ...]]
    fresh: dict[str, bool]
    numel: dict[str, tuple[int, int]]
    integer: frozenset[str] = frozenset()

    def nbytes(self, location: str, rows: int, tokens: int, dtype: torch.dtype) -> int:
        a, b = self.numel[location]
        size = 8 if location in self.integer else torch.empty((), dtype=dtype).element_size()
        return rows * (a + b * tokens) * size


_FLOWS: dict[tuple, Dataflow] = {}


def _first_tensor(args: Sequence[Any], kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else next(iter(kwargs.values()), None)
    return value if isinstance(value, torch.Tensor) else None


def _output_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _probe(model: torch.nn.Module, tokens: int, keep_last: bool) -> tuple[dict, dict, dict, dict, set]:
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"  # dataflow around attention does not depend on its kernel;
    with torch.device("meta"):             # the fused kernels' mask checks need values meta lacks
        probe = type(model)(config)
    probe.eval()
    keep: list[torch.Tensor] = []  # every tensor seen stays alive, so no id is reused
    seen: dict[tuple[int, int], list[str]] = {}  # (id, version) -> locations that held it
    sources: dict[str, tuple[str, ...]] = {}
    fresh: dict[str, bool] = {}
    numel: dict[str, int] = {}
    integer: set[str] = set()

    def note(t: torch.Tensor, location: str) -> None:
        keep.append(t)
        numel[location] = t.numel()
        if not t.is_floating_point():
            integer.add(location)
        seen.setdefault((id(t), t._version), []).append(location)

    def before(name: str):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                sources.setdefault(name, tuple(seen.get((id(x), x._version), ())))
                note(x, f"{name}.input")
        return hook

    def after(name: str):
        def hook(module, args, kwargs, out):
            y = _output_tensor(out)
            if y is not None:
                known = {id(t) for t in keep}
                fresh.setdefault(name, id(y) not in known and (y._base is None or id(y._base) not in known))
                note(y, f"{name}.output")
        return hook

    handles = []
    for name, module in probe.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name), with_kwargs=True))
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    note(ids, REQUEST_INPUT_IDS)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(1, tokens, dtype=torch.long, device="meta"),
                              "use_cache": False}
    if keep_last:
        kwargs["logits_to_keep"] = 1
    try:
        with torch.no_grad():
            out = probe(input_ids=ids, **kwargs)
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            numel["output"] = logits.numel()
    finally:
        for handle in handles:
            handle.remove()
    return sources, fresh, numel, {}, integer


def dataflow(model: torch.nn.Module, *, keep_last: bool = True) -> Dataflow:
    """Probe ``model`` (a weightless copy of it: nothing is computed) for :class:`Dataflow`.

    ``keep_last``: whether requests ask for the last position's logits only (``logits_to_keep=1``,
    what ``Grafter.remote`` sends unless ``all_logits=True``)."""
    key = (type(model), model.config.to_json_string(), keep_last)
    if key not in _FLOWS:
        sources, fresh, small, _, integer = _probe(model, 3, keep_last)
        _, _, large, _, _ = _probe(model, 5, keep_last)
        numel = {}
        for location, n3 in small.items():
            b = (large.get(location, n3) - n3) // 2
            numel[location] = (n3 - 3 * b, b)
        _FLOWS[key] = Dataflow(sources, fresh, numel, frozenset(integer))
    return _FLOWS[key]


def input_source(flow: Dataflow, path: str, held: set[str]) -> str | None:
    """Where a program gets ``path``'s input from: the earliest of ``held`` (locations the program
    already has) that holds the same tensor, or None (read it)."""
    for location in flow.sources.get(path, ()):
        if location in held:
            return location
    return None


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One activation access of a request: ``read`` (its value travels to the sandbox and is
    written back) or ``write`` (an assignment: the value travels once)."""

    location: str
    kind: str
    bytes: int


@dataclass
class Traffic:
    """The activation accesses of one request and what they move over NDIF's sandbox socket."""

    accesses: list[Access] = field(default_factory=list)

    @property
    def reads(self) -> int:
        return sum(a.kind == "read" for a in self.accesses)

    @property
    def assignments(self) -> int:
        return sum(a.kind == "write" for a in self.accesses)

    @property
    def round_trips(self) -> int:
        """Sandbox socket round trips: two per read (the read, NDIF's write-back), one per write."""
        return 2 * self.reads + self.assignments

    @property
    def bytes(self) -> int:
        """Activation bytes crossing the sandbox socket, both directions."""
        return sum(a.bytes * (2 if a.kind == "read" else 1) for a in self.accesses)

    def sandbox_messages(self) -> dict[str, int]:
        """As NDIF's sandbox counts them: reads, writes (write-backs included) and their bytes."""
        read_bytes = sum(a.bytes for a in self.accesses if a.kind == "read")
        write_bytes = read_bytes + sum(a.bytes for a in self.accesses if a.kind == "write")
        return {"reads": self.reads, "writes": self.reads + self.assignments, "round_trips": self.round_trips,
                "read_bytes": read_bytes, "write_bytes": write_bytes}


def program_traffic(program: dict, flow: Dataflow, rows: int, tokens: int, dtype: torch.dtype) -> Traffic:
    """The accesses :func:`nngraft.backends.functional.run_program` makes for ``program`` on a batch of
    ``rows`` × ``tokens``, with activations in ``dtype``."""
    traffic = Traffic()

    def add(location: str, kind: str) -> None:
        traffic.accesses.append(Access(location, kind, flow.nbytes(location, rows, tokens, dtype)))

    for op in program["ops"]:
        if op.get("gate"):  # a LoRA adapter's A·x: rank numbers per cell, read and written back
            size = torch.empty((), dtype=getattr(torch, op["dtype"])).element_size()
            traffic.accesses.append(Access(f"{op['path']}.output", "read", rows * tokens * op["rank"] * size))
            continue
        if op.get("input") is None:
            add(f"{op['path']}.input", "read")
        add(f"{op['path']}.output", "read")
        if not op.get("in_place"):
            add(f"{op['path']}.output", "write")
    add("output", "read")  # the logits, saved
    return traffic


def plan_ops(paths: Sequence[str], flow: Dataflow) -> list[dict]:
    """For grafted module ``paths`` in forward order: where each op's input comes from, whether
    its output is edited in place, and which held values it may release afterwards."""
    held: set[str] = {REQUEST_INPUT_IDS}
    ops = []
    for path in paths:
        source = input_source(flow, path, held)
        ops.append({"path": path, "input": source, "in_place": bool(flow.fresh.get(path, False))})
        held |= {f"{path}.input", f"{path}.output"}
    needed_later: set[str] = set()
    for op in reversed(ops):  # a held value is released after its last use
        op["release"] = [loc for loc in (f"{op['path']}.input", f"{op['path']}.output") if loc not in needed_later]
        if op["input"] is not None:
            if op["input"] not in needed_later and op["input"] != REQUEST_INPUT_IDS:
                op["release"].append(op["input"])
            needed_later.add(op["input"])
    return ops


def estimate_traffic(paths: Sequence[str], model: torch.nn.Module, rows: int, tokens: int,
                     dtype: torch.dtype = torch.bfloat16, *, keep_last: bool = True,
                     share_inputs: bool = True) -> Traffic:
    """Activation traffic of one request grafting ``paths`` (leaf modules, forward order), from
    shapes only (``model`` may be weightless). ``share_inputs=False``: as a program that reads
    every module's input and assigns every output (nngraft before it counted this cost).

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> P, _, _ = tiny_pair("llama")
        >>> t = estimate_traffic(["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"], P, 1, 4)
        >>> t.reads, t.round_trips  # gate: input + output; up: output (same input); the logits
        (4, 8)
    """
    flow = dataflow(model, keep_last=keep_last)
    ops = plan_ops(list(paths), flow) if share_inputs else [{"path": p, "input": None} for p in paths]
    return program_traffic({"ops": ops}, flow, rows, tokens, dtype)
