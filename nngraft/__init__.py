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

from .arch import ADAPTERS, Adapter, adapter_for, register_adapter
from .donor import Donor, ModelDonor, SafetensorsDonor, TensorDonor
from .delta import DeltaDonor, DenseDonor, LoraDonor
from .errors import (
    ArgumentError,
    ComponentNotFoundError,
    DonorMismatchError,
    GraftError,
    LayerRangeError,
    PositionError,
    PromptError,
    SpanNotFoundError,
    SpecError,
    TraceError,
    UnsupportedArchitectureError,
)
from .grafter import GenerationResult, Grafter
from .plan import GraftPlan, compile_plan
from .result import GraftResult
from .spec import (
    SCHEMA_VERSION,
    WeightSelection,
    All,
    GraftRule,
    GraftSpec,
    Index,
    Last,
    LayerRange,
    Not,
    Other,
    Span,
    everywhere_except,
    resolve_layers,
    spec_json_schema,
)
from .tokens import SpanAlignmentWarning
from .trace import CompiledGraft, graft

__version__ = "0.1.0"

PositionSelector = Span | Last | Index | Other | All | Not
"""Where in the prompt a rule grafts (see :mod:`nngraft.spec`)."""

__all__ = [
    "ADAPTERS", "Adapter", "All", "ArgumentError", "CompiledGraft", "ComponentNotFoundError", "DeltaDonor", "DenseDonor", "Donor",
    "DonorMismatchError", "LoraDonor",
    "GenerationResult", "GraftError", "GraftPlan", "GraftResult", "GraftRule", "GraftSpec", "Grafter",
    "Index", "Last", "LayerRange", "LayerRangeError", "ModelDonor", "Not", "Other", "PositionError",
    "PositionSelector", "PromptError", "SCHEMA_VERSION", "SafetensorsDonor", "Span", "SpanAlignmentWarning",
    "SpanNotFoundError", "SpecError", "TensorDonor", "TraceError", "UnsupportedArchitectureError", "WeightSelection",
    "adapter_for",
    "compile_plan", "everywhere_except", "graft", "register_adapter", "resolve_layers", "spec_json_schema",
]
