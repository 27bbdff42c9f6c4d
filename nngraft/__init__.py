"""nngraft — dynamic weight grafting in one nnsight pass.

Run a pretrained model P with a finetuned model F's weights grafted in for chosen components, at
chosen layers, at chosen token positions (Nief et al., "Dynamic Weight Grafting", ICLR 2026).

    spec (GraftSpec, JSON)  →  plan (GraftPlan)  →  backend (one pass of P: here, or on NDIF)  →  results

Example:
    >>> from nngraft import GraftSpec
    >>> GraftSpec.model_validate_json('{"name": "lt", "rules": [{"components": ["all"], '
    ...     '"positions": [{"last": true}]}]}').name
    'lt'
"""

import importlib
from typing import TYPE_CHECKING, Any

from . import deprecated

deprecated.install()  # old module paths (nngraft.plan, nngraft.donor, …) keep working for one release

from .util.progress import quiet_notebook_tqdm

quiet_notebook_tqdm()  # in a notebook without ipywidgets: no "IProgress not found" warning when transformers loads

_EXPORTS = {
    "arch": ["ADAPTERS", "Adapter", "adapter_for", "register_adapter"],
    "donors.donor": ["Donor", "ModelDonor", "SafetensorsDonor", "TensorDonor"],
    "donors.delta": ["DeltaDonor", "DenseDonor", "LoraDonor"],
    "errors": ["ArgumentError", "ComponentNotFoundError", "DonorMismatchError", "GraftError", "LayerRangeError",
               "PositionError", "PromptError", "SpanNotFoundError", "SpecError", "TraceError",
               "UnsupportedArchitectureError"],
    "grafter": ["Grafter"],
    "compile.plan": ["GraftPlan", "compile_plan"],
    "result": ["GenerationResult", "GraftResult", "GridResult"],
    "spec": ["SCHEMA_VERSION", "WeightSelection", "All", "GraftRule", "GraftSpec", "Index", "Last", "LayerRange",
             "Not", "Other", "Span", "everywhere_except", "resolve_layers", "spec_json_schema"],
    "compile.tokens": ["SpanAlignmentWarning"],
    "compile.trace": ["CompiledGraft", "graft"],
}
"""Public names and the module each lives in. They are imported on first use (PEP 562), so
``import nngraft`` — and ``nngraft --help`` — does not load torch, transformers or nnsight."""
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .arch import ADAPTERS, Adapter, adapter_for, register_adapter  # noqa: F401
    from .donors.delta import DeltaDonor, DenseDonor, LoraDonor  # noqa: F401
    from .donors.donor import Donor, ModelDonor, SafetensorsDonor, TensorDonor  # noqa: F401
    from .errors import (ArgumentError, ComponentNotFoundError, DonorMismatchError, GraftError,  # noqa: F401
                         LayerRangeError, PositionError, PromptError, SpanNotFoundError, SpecError,
                         TraceError, UnsupportedArchitectureError)
    from .grafter import Grafter  # noqa: F401
    from .compile.plan import GraftPlan, compile_plan  # noqa: F401
    from .result import GenerationResult, GraftResult, GridResult  # noqa: F401
    from .spec import (SCHEMA_VERSION, All, GraftRule, GraftSpec, Index, Last, LayerRange, Not,  # noqa: F401
                       Other, Span, WeightSelection, everywhere_except, resolve_layers, spec_json_schema)
    from .compile.tokens import SpanAlignmentWarning  # noqa: F401
    from .compile.trace import CompiledGraft, graft  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "PositionSelector":
        spec = importlib.import_module(".spec", __name__)
        value: Any = spec.Span | spec.Last | spec.Index | spec.Other | spec.All | spec.Not
    elif name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'nngraft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF) | {"PositionSelector"})


__version__ = "0.1.0"

# PositionSelector = Span | Last | Index | Other | All | Not: where in the prompt a rule grafts
# (see nngraft.spec); built on first use by __getattr__.

__all__ = [
    "ADAPTERS", "Adapter", "All", "ArgumentError", "CompiledGraft", "ComponentNotFoundError", "DeltaDonor", "DenseDonor", "Donor",
    "DonorMismatchError", "LoraDonor",
    "GenerationResult", "GraftError", "GraftPlan", "GraftResult", "GraftRule", "GraftSpec", "Grafter", "GridResult",
    "Index", "Last", "LayerRange", "LayerRangeError", "ModelDonor", "Not", "Other", "PositionError",
    "PositionSelector", "PromptError", "SCHEMA_VERSION", "SafetensorsDonor", "Span", "SpanAlignmentWarning",
    "SpanNotFoundError", "SpecError", "TensorDonor", "TraceError", "UnsupportedArchitectureError", "WeightSelection",
    "adapter_for",
    "compile_plan", "everywhere_except", "graft", "register_adapter", "resolve_layers", "spec_json_schema",
]
