"""Graftable modules as pure functions — the code that runs *inside* a remote (NDIF) trace.

On NDIF only the pretrained model P is hosted. A graft there cannot call a donor module or swap
parameters into P's module (the module the server's user code sees may be a weightless stand-in,
and referencing a second model's modules silently resolves to P's own). So the donor travels as
plain tensors and its output is computed from what P's module *receives* and *returns*:

- ``replace``: ``y = f(x; θ_F)`` — F's own parameters, computed with the module's formula;
- ``correct``: ``y = y_P + f(x; Δθ) - f(x; 0)`` — P's own output plus the part of F's output that
  differs, for a weight delta ``Δθ = θ_F − θ_P`` (dense, or low-rank ``ΔW ≈ B·A`` as in LoRA).
  Every graftable module is affine in each of its parameters, so this is exact up to rounding.

A *program* is plain data (dicts, lists, strings, numbers and tensors; no nngraft objects) so it
can be pickled into a request that a server without nngraft installed can load. This module
imports only ``torch`` and ``nnsight``, and is registered with ``nnsight.register`` so its source
travels with each request (see :mod:`nngraft.backends.ndif`).

Module forms (``kind``) and their formulas mirror ``transformers`` exactly; which form a module
has is decided on the client — by its row in the table of module kinds (:mod:`nngraft.arch.kinds`,
whose ``functional`` names are this module's :data:`KINDS`) and, for norms, by checking the
candidate formulas bit for bit against the module's own forward
(:func:`nngraft.backends.ndif.module_kind`). The names are strings because a program is plain
data that a server without nngraft loads:

========== ===================================================================================
linear     ``F.linear(x, W, b)``                                  (``nn.Linear``)
conv1d     ``addmm(b, x, W)`` with ``W`` stored (in, out)          (GPT-2 ``Conv1D``)
embedding  ``F.embedding(ids, W) * scale``                         (``nn.Embedding``, Gemma's scaled)
rms_llama  ``w * (x·rsqrt(mean x² + eps)).to(dtype)``               (Llama, Mistral, Qwen2/3)
rms_olmo2  ``(w * x·rsqrt(mean x² + eps)).to(dtype)``               (OLMo-2)
rms_gemma  ``(x·rsqrt(mean x² + eps) * (1 + w)).to(dtype)``         (Gemma 1/2/3)
layer_norm ``F.layer_norm(x, shape, w, b, eps)``                    (``nn.LayerNorm``)
========== ===================================================================================

Example:
    >>> import torch
    >>> x, W = torch.randn(2, 3), torch.randn(4, 3)
    >>> torch.equal(forward("linear", x, {"weight": W}, {}), torch.nn.functional.linear(x, W))
    True
"""

from __future__ import annotations

from typing import Any

import nnsight
import torch

PROGRAM_VERSION = 4
INPUT_IDS_SLOT = -1
"""The slot of ``held`` (see :func:`apply_op`) holding the request's own ``input_ids``."""
KINDS = ("linear", "conv1d", "embedding", "rms_llama", "rms_olmo2", "rms_gemma", "layer_norm")


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _scale(const: dict, like: torch.Tensor) -> Any:
    # Gemma keeps the scale as a float32 buffer and casts it to the weight's dtype before use.
    return torch.tensor(const["scale"], dtype=torch.float32, device=like.device).to(like.dtype)


def forward(kind: str, x: torch.Tensor, p: dict, const: dict) -> torch.Tensor:
    """The output of a ``kind`` module with parameters ``p`` (``weight``, ``bias``) on input ``x``."""
    w, b = p.get("weight"), p.get("bias")
    if kind == "linear":
        return torch.nn.functional.linear(x, w, b)
    if kind == "conv1d":
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w) if b is not None else x.reshape(-1, x.shape[-1]) @ w
        return out.view(x.shape[:-1] + (w.shape[-1],))
    if kind == "embedding":
        y = torch.nn.functional.embedding(x, w)
        return y * _scale(const, w) if const.get("scale") is not None else y
    if kind == "rms_llama":
        return w * _rms(x, const["eps"]).to(x.dtype)
    if kind == "rms_olmo2":
        return (w * _rms(x, const["eps"])).to(x.dtype)
    if kind == "rms_gemma":
        return (_rms(x, const["eps"]) * (1.0 + w.float())).type_as(x)
    if kind == "layer_norm":
        return torch.nn.functional.layer_norm(x, tuple(const["shape"]), w, b, const["eps"])
    raise ValueError(f"nngraft.backends.functional: unknown module kind {kind!r}")


def _lowrank(x: torch.Tensor, d: dict, name: str) -> torch.Tensor | None:
    """``x · (B A)ᵀ`` for a factored delta ``{name}.A`` (r×in), ``{name}.B`` (out×r), or None."""
    a, b = d.get(name + ".A"), d.get(name + ".B")
    if a is None:
        return None
    return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)


def correction(kind: str, x: torch.Tensor, d: dict, const: dict) -> torch.Tensor:
    """``f(x; θ_P + Δ) − f(x; θ_P)`` for deltas ``d``: dense (``weight``, ``bias``) or factored
    (``weight.A``, ``weight.B``), times ``const["lora_scale"]`` for the factored part (LoRA).
    A module whose deltas are all zero is not sent at all (F equals P there)."""
    scale = const.get("lora_scale", 1.0)
    dw, db = d.get("weight"), d.get("bias")
    parts = []
    if kind in ("linear", "conv1d"):
        low = _lowrank(x, d, "weight")
        if low is not None:
            parts.append(low * scale if scale != 1.0 else low)
        elif dw is not None and kind == "linear":
            parts.append(torch.nn.functional.linear(x, dw))
        elif dw is not None:
            parts.append((x.reshape(-1, x.shape[-1]) @ dw).view(x.shape[:-1] + (dw.shape[-1],)))
    elif kind == "embedding":
        a = d.get("weight.A")
        if a is not None:  # ΔWᵀ ≈ B·A with A: r×vocab, B: dim×r
            low = torch.nn.functional.linear(a.t()[x], d["weight.B"])
            parts.append(low * scale if scale != 1.0 else low)
        elif dw is not None:
            parts.append(torch.nn.functional.embedding(x, dw))
        if parts and const.get("scale") is not None:
            parts[0] = parts[0] * _scale(const, parts[0])
    elif kind in ("rms_llama", "rms_olmo2", "rms_gemma", "layer_norm"):
        if dw is not None and kind == "rms_llama":
            parts.append(dw * _rms(x, const["eps"]).to(x.dtype))
        elif dw is not None and kind == "rms_olmo2":
            parts.append((dw * _rms(x, const["eps"])).to(x.dtype))
        elif dw is not None and kind == "rms_gemma":
            parts.append((_rms(x, const["eps"]) * dw.float()).type_as(x))
        elif dw is not None:
            n = torch.nn.functional.layer_norm(x, tuple(const["shape"]), None, None, const["eps"])
            parts.append(n * dw)
    else:
        raise ValueError(f"nngraft.backends.functional: unknown module kind {kind!r}")
    if db is not None:
        parts.append(db)
    if not parts:
        raise ValueError(f"nngraft.backends.functional: a {kind} correction with no deltas")
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def donor_output(kind: str, source: dict, const: dict, x: torch.Tensor, y_p: torch.Tensor) -> torch.Tensor:
    """One donor's output of a ``kind`` module at the gathered cells: ``x`` is the module's input
    there, ``y_p`` P's output there. ``source`` holds the donor's ``mode`` and ``tensors``."""
    tensors = {k: v.to(device=y_p.device, dtype=y_p.dtype) for k, v in source["tensors"].items()}
    const = {**const, **source["const"]}
    if source["mode"] == "replace":
        return forward(kind, x, tensors, const)
    if source["mode"] == "correct":
        return y_p + correction(kind, x, tensors, const).to(y_p.dtype)
    raise ValueError(f"nngraft.backends.functional: unknown op mode {source['mode']!r}")


def envoy_at(root: Any, path: str) -> Any:
    """The envoy at a dotted module path below ``root`` (``model.layers.3.mlp.up_proj``)."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_op(root: Any, op: dict, held: dict | None = None, slots: tuple = (None, None)) -> None:
    """Inside a trace: replace one module's output at each source's cells with that donor's output.

    ``op``: ``path``, ``kind``, ``const``, ``axis`` (the token dimension), and ``sources`` — one per
    donor grafting this module, each with ``mode``, ``tensors``, ``const``, the union ``rows`` /
    ``cols`` of its cells, and ``parts`` (``rows``, ``cols``, ``select`` into the union, and
    ``features`` for part of a fused projection). Different sources never share a cell.

    Activation accesses are the cost on NDIF's sandboxed path (each read crosses a socket twice),
    so: ``input`` is the slot of ``held`` whose value IS this module's input (an earlier op's
    input or edited output, or the request's ``input_ids``), or None to read it; with ``in_place``
    the output is edited where it lies (the module returned a fresh tensor), else replaced by an
    assignment; ``slots`` are where this op's input and output are held (op ``i``: ``2i``, ``2i+1``),
    ``release`` the slots no later op needs."""
    held = {} if held is None else held
    envoy = envoy_at(root, op["path"])
    axis = op["axis"]
    source_name = op.get("input")
    x = held[source_name] if source_name in held else envoy.input
    held[slots[0]] = x
    if x.dim() > 1 and axis != 1:
        x = x.movedim(axis, 1)
    new = envoy.output if op.get("in_place") else envoy.output.clone()
    view = new.movedim(axis, 1) if axis != 1 else new
    ys = []  # every donor output is computed before any cell is written (x may be the output itself)
    for source in op["sources"]:
        rows, cols = source["rows"].to(view.device), source["cols"].to(view.device)
        # x's cells on the module's device: the request's input_ids stay on the CPU, and on a
        # model split over devices a module's input may still be on the previous module's device
        cells = x[rows.to(x.device), cols.to(x.device)].to(view.device)
        ys.append(donor_output(op["kind"], source, op["const"], cells, view[rows, cols]))
    for source, y in zip(op["sources"], ys):
        for part in source["parts"]:
            piece = y if part["select"] is None else y[part["select"].to(y.device)]
            prow, pcol = part["rows"].to(view.device), part["cols"].to(view.device)
            if part["features"] is None:
                view[prow, pcol] = piece
            else:
                features = part["features"].to(view.device)
                block = view[prow, pcol]
                block[..., features] = piece[..., features]
                view[prow, pcol] = block
    if not op.get("in_place"):
        envoy.output = new
    held[slots[1]] = new
    for name in op.get("release", ()):
        held.pop(name, None)


def apply_gate(root: Any, op: dict, masks: list) -> None:
    """Inside a trace: keep a LoRA adapter (attached to the model, as NDIF attaches a ``peft=``
    adapter) only at the grafted cells of one adapted module. ``op["path"]`` is the adapter's
    ``lora_A`` module; its output ``A·x`` (rank r per token) is zeroed at every cell where
    ``masks[op["mask"]]`` (rows × tokens, True = grafted) is False, so ``B·(A·x)`` adds exactly
    nothing there and the module returns P's own output. Edited in place: one read of r numbers
    per token."""
    envoy = envoy_at(root, op["path"])
    out = envoy.output
    keep = masks[op["mask"]].to(out.device)
    out.masked_fill_(~keep.unsqueeze(-1), 0)


def apply_ops(root: Any, program: dict, input_ids: Any = None) -> None:
    """Inside a trace of ``root``: apply every op of ``program`` in order (``input_ids``: the
    request's token ids, the token embedding's input; read from the model when not given)."""
    if program.get("version") != PROGRAM_VERSION:
        raise ValueError(
            f"nngraft program version {program.get('version')!r} is not {PROGRAM_VERSION}; "
            "client and server code disagree"
        )
    held = {INPUT_IDS_SLOT: input_ids} if input_ids is not None else {}
    for i, op in enumerate(program["ops"]):
        if op.get("gate"):
            apply_gate(root, op, program["masks"])
        else:
            apply_op(root, op, held, (2 * i, 2 * i + 1))


def run_program(root: Any, program: dict, input_ids: Any = None) -> Any:
    """Inside a trace of ``root``: apply every op in order; return the saved logits."""
    apply_ops(root, program, input_ids)
    return nnsight.save(root.output.logits)


def check_input_ids(root: Any, expected: torch.Tensor) -> None:
    """Inside a trace of ``root``: raise unless the traced batch's ``input_ids`` are ``expected``
    (a graft's cells refer to one left-padded batch; on another they would land on wrong tokens)."""
    args, kwargs = root.inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if (not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(expected.shape)
            or not torch.equal(ids.detach().cpu(), expected.cpu())):
        got = "no input_ids" if not isinstance(ids, torch.Tensor) else f"input_ids of shape {tuple(ids.shape)}"
        raise ValueError(
            f"graft: the trace runs {got}, but the graft was compiled for other input_ids (shape "
            f"{tuple(expected.shape)}, left-padded as nngraft tokenizes); open the trace with "
            "model.trace(**compiled.inputs)"
        )


def run_graft(root: Any, program: dict, input_ids: torch.Tensor) -> None:
    """Inside a trace of ``root``: check the batch, then apply ``program``'s ops."""
    check_input_ids(root, input_ids)
    apply_ops(root, program)


def grafted(root: Any, program: dict, input_ids: torch.Tensor) -> Any:
    """An nnsight edit of envoy ``root`` (a copy sharing its modules) whose every trace first runs
    ``program`` as its own intervention block, ahead of the trace's own code. The edit travels
    with a remote request (nnsight ships an envoy's edits)."""
    with root.edit() as (_, edited):
        run_graft(edited, program, input_ids)
    return edited
