"""Virtual GPUs on a CPU-only torch: tensors that say they live on ``cuda:0`` / ``cuda:1``, are
computed on the CPU, and raise torch's own device-mismatch error when an op mixes devices.

Used by tests/backends/test_devices.py to prove that nngraft puts every tensor it makes on the device of
the module it feeds, with P on one GPU or split over two the way ``device_map="auto"`` splits it,
on a machine without a GPU. Two parts:

- :class:`VTensor`, a wrapper tensor subclass: ``.device`` is the virtual device, ``.inner`` the
  CPU tensor holding the values. Every op on it is unwrapped, checked and computed on the CPU, and
  its results are wrapped again with the op's device.
- :class:`VirtualDevices`, a dispatch mode: inside it, factory functions given a CUDA device
  (``torch.empty(..., device="cuda:1")``, ``torch.arange``, ``torch.tensor``, ``x.to("cuda:0")``)
  make VTensors, so torch, transformers, accelerate and nnsight allocate on the device they are
  told, as on a GPU.

The device rule is torch's: all tensor arguments of an op share one device, except 0-d CPU
tensors (scalars), the source of a copy (``copy_``, ``to``), and index tensors of advanced
indexing (``x[idx]``, ``x[idx] = v``), which may be on the CPU. A violation raises
``RuntimeError: Expected all tensors to be on the same device, but found at least two devices,
cuda:0 and cpu!`` as CUDA torch does.

Not covered: autograd (the mode runs under ``torch.no_grad``: a CUDA grad accumulator cannot be
made without CUDA), CUDA streams, kernels and memory (values are computed by the CPU kernels),
and the inside of C++ functions that open a CUDA device guard before dispatch (``Tensor.norm``, ...):
those are run on the CPU tensors after their arguments are checked by the rule above (the
ops they call inside are not checked one by one).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
CPU = torch.device("cpu")
MIXED_DEVICES_ALLOWED = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                         aten.index_put.default, aten._index_put_impl_.default}
"""Ops that may take tensors on several devices (the source of a copy; CPU index tensors)."""


def mismatch(a: torch.device, b: torch.device, where: str) -> RuntimeError:
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                        f"{a} and {b}! (virtual devices: {where})")


def inner_of(t: Any) -> torch.Tensor | None:
    return t.__dict__.get("inner") if isinstance(t, torch.Tensor) else None


class VTensor(torch.Tensor):
    """A CPU tensor (``inner``) that reports a virtual CUDA device."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device) -> "VTensor":
        assert inner_of(inner) is None and inner.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                 storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                 device=device, requires_grad=False)
        out.inner = inner
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"VTensor({self.inner!r}, device='{self.device}')"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            self, index = args
            with torch._C.DisableTorchFunctionSubclass():
                return wrap(self.inner[_index(self, index)], self.device)
        if func is torch.Tensor.__setitem__:
            self, index, value = args
            if isinstance(value, torch.Tensor):
                if value.device != self.device and not (value.device.type == "cpu" and value.dim() == 0):
                    raise mismatch(self.device, value.device, "__setitem__")
                value = inner_of(value) if inner_of(value) is not None else value
            with torch._C.DisableTorchFunctionSubclass():
                self.inner[_index(self, index)] = value
            return None
        if func is torch.Tensor.contiguous:
            self = args[0]
            memory_format = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
            return self if self.is_contiguous(memory_format=memory_format) else \
                aten.clone.default(self, memory_format=memory_format)
        if func is torch.Tensor.copy_:
            return aten.copy_.default(*args, **kwargs)
        if func in (torch.Tensor.nonzero, torch.nonzero):
            found = aten.nonzero.default(args[0])
            return tuple(found.unbind(1)) if kwargs.get("as_tuple", False) else found
        if func is torch.Tensor.__deepcopy__:
            self, memo = args
            new = VTensor(copy.deepcopy(self.inner, memo), self.device)
            if self.__dict__.get("_is_param"):
                new._is_param = True
            memo[id(self)] = new
            return new
        if func is torch.Tensor.tolist:
            return args[0].inner.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError(f"can't convert {args[0].device} device type tensor to numpy. Use Tensor.cpu() to "
                            "copy the tensor to host memory first.")
        with torch._C.DisableTorchFunctionSubclass():
            try:
                return func(*args, **kwargs)
            except RuntimeError as error:
                if "not linked with support for cuda" not in str(error):
                    raise
        # A binding that opens a CUDA device guard before dispatch (Tensor.norm, ...): check its
        # tensor arguments by the same rule and run it on the CPU tensors.
        return run_op(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


def wrap(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return VTensor(t, device) if device.type == "cuda" and t.device.type == "cpu" else t


def _index(self: torch.Tensor, index: Any) -> Any:
    """``index`` with its tensors unwrapped, after torch's rule: on the CPU or on ``self``'s device."""
    def one(i: Any) -> Any:
        if isinstance(i, torch.Tensor):
            if i.device.type != "cpu" and i.device != self.device:
                raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed "
                                   f"tensor ({self.device}), got {i.device} (virtual devices)")
            return inner_of(i) if inner_of(i) is not None else i
        if isinstance(i, (list, tuple)):
            return type(i)(one(j) for j in i)
        return i
    return one(index)


def run_op(func: Any, args: tuple, kwargs: dict) -> Any:
    """Check ``func``'s devices, run it on the CPU tensors, wrap the results with its device."""
    devices: list[torch.device] = []
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0):
            if t.device not in devices:
                devices.append(t.device)
    if len(devices) > 1 and func not in MIXED_DEVICES_ALLOWED:
        raise mismatch(devices[0], devices[1], str(func))
    device = devices[0] if devices else CPU
    if func in MIXED_DEVICES_ALLOWED and isinstance(args[0], torch.Tensor):
        device = args[0].device  # the destination of a copy, the indexed tensor
    kwargs = dict(kwargs)
    if kwargs.get("device") is not None:
        device = torch.device(kwargs["device"])
        if device.type == "cuda":
            kwargs["device"] = CPU
    wrappers: dict[int, torch.Tensor] = {}

    def unwrap(t: Any) -> Any:
        inner = inner_of(t)
        if inner is None:
            return t
        wrappers[id(inner)] = t
        return inner

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def rewrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or inner_of(t) is not None:
            return t
        if id(t) in wrappers:  # an in-place op or out=: the argument itself
            return wrappers[id(t)]
        return wrap(t, device)
    return tree_map(rewrap, out)


class VirtualDevices(TorchDispatchMode):
    """Inside: factories given a CUDA device make :class:`VTensor` s (see the module docstring).
    Enter it with :func:`virtual_devices`, which also turns off autograd."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


_LOCK = threading.Lock()


@contextmanager
def virtual_devices() -> Iterator[None]:
    """Virtual CUDA devices in this thread (and no autograd) for the duration of the block."""
    import torch.cuda

    lazy_init = torch.cuda._lazy_init
    lift = torch._C._only_lift_cpu_tensors()
    # A CUDA device named to a factory makes torch initialise CUDA first (absent here): skip it.
    # torch.tensor(..., device="cuda") builds on the CPU and lifts through dispatch (as FakeTensorMode).
    torch.cuda._lazy_init = lambda: None
    torch._C._set_only_lift_cpu_tensors(True)
    try:
        with VirtualDevices(), torch.no_grad():
            yield
    finally:
        torch._C._set_only_lift_cpu_tensors(lift)
        torch.cuda._lazy_init = lazy_init


# ---------------------------------------------------------------------------------------------
# Placement: one device, or split like device_map="auto" with accelerate's hooks
# ---------------------------------------------------------------------------------------------


def place(module: torch.nn.Module, device: Any, memo: dict | None = None) -> torch.nn.Module:
    """Move ``module``'s parameters and buffers to ``device`` (virtual when CUDA), keeping tied
    parameters tied (``memo``: the tensors already moved)."""
    device = torch.device(device)
    memo = {} if memo is None else memo
    for m in module.modules():
        for table, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, value in list(table.items()):
                if value is None:
                    continue
                if id(value) not in memo:
                    inner = inner_of(value) if inner_of(value) is not None else value.detach()
                    moved = wrap(inner, device)
                    memo[id(value)] = torch.nn.Parameter(moved, requires_grad=False) if is_param else moved
                table[name] = memo[id(value)]
    return module


def split_map(model: torch.nn.Module, layers_path: str, n_layers: int, n_devices: int = 2) -> dict[str, int]:
    """Module path → device index as ``device_map="auto"`` fills devices in forward order: what
    comes before the layers on the first device, the layers in equal consecutive runs, what
    comes after on the last; modules sharing a tied parameter on one device (as accelerate keeps them)."""
    per = -(-n_layers // n_devices)
    out: dict[str, int] = {}
    after_layers = False
    for name, child in model.named_modules():
        if not name or name == layers_path or any(name.startswith(k + ".") for k in out):
            continue
        if name.startswith(layers_path + "."):
            rest = name[len(layers_path) + 1:]
            if rest.isdigit():
                out[name] = min(int(rest) // per, n_devices - 1)
                after_layers = True
            continue
        if layers_path.startswith(name + "."):
            continue  # a container of the layers
        if next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            continue
        out[name] = n_devices - 1 if after_layers else 0
    owner: dict[int, int] = {}
    for name in out:
        for p in model.get_submodule(name).parameters():
            out[name] = owner.setdefault(id(p), out[name])
    return out


def layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """The path and length of the model's stack of layers (the ``ModuleList`` as long as the
    config's layer count), found without nngraft (the NDIF stand-in process cannot import it)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, n
    raise ValueError(f"no stack of {n} layers in {type(model).__name__}")


def dispatch(model: torch.nn.Module, device_map: dict[str, int]) -> torch.nn.Module:
    """Place each mapped module on ``cuda:i`` and attach accelerate's ``AlignDevicesHook`` to it
    (its inputs move to its device, as in ``dispatch_model``); the model's outputs come back on
    its first device. Sets ``hf_device_map`` like ``from_pretrained(device_map=...)``."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    memo: dict = {}
    for name, index in device_map.items():
        device = torch.device("cuda", index)
        place(model.get_submodule(name), device, memo)
        add_hook_to_module(model.get_submodule(name), AlignDevicesHook(execution_device=device), append=True)
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    model.hf_device_map = dict(device_map)
    return model


def on_one_device(model: torch.nn.Module, index: int = 0) -> torch.nn.Module:
    """The whole model on ``cuda:index`` (``from_pretrained(device_map="cuda:0")``)."""
    place(model, torch.device("cuda", index))
    model.hf_device_map = {"": index}
    return model


def devices_of(model: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in model.parameters()}
