"""Graft specs: *what* to graft — components × layers × positions — as plain, versioned JSON data.

The schema (pydantic models, validation, the JSON schema) lives in :mod:`nngraft.spec.schema`;
this package re-exports its public names, so ``from nngraft.spec import GraftSpec`` is the way in.

Example:
    >>> from nngraft.spec import GraftRule, GraftSpec, Last
    >>> GraftSpec(name="lt", rules=[GraftRule(components=["mlp"], positions=[Last()])]).rules[0].components
    ['mlp']
"""

from .schema import (COMPONENT_GROUPS, COMPONENTS, GLOBAL_COMPONENTS, LAYER_COMPONENTS, SCHEMA_VERSION, All,
                     ComponentName, GraftRule, GraftSpec, Index, Last, LayerGroups, LayerRange, LayerSelection,
                     ModelRef, Not, Other, PositionSelector, Span, SpecLike, WeightSelection, as_spec,
                     everywhere_except, format_validation_error, paper_layer_group, resolve_layers, spec_json_schema)

__all__ = ["COMPONENT_GROUPS", "COMPONENTS", "GLOBAL_COMPONENTS", "LAYER_COMPONENTS", "SCHEMA_VERSION", "All",
           "ComponentName", "GraftRule", "GraftSpec", "Index", "Last", "LayerGroups", "LayerRange", "LayerSelection", "ModelRef",
           "Not", "Other", "PositionSelector", "Span", "SpecLike", "WeightSelection", "as_spec", "everywhere_except",
           "format_validation_error", "paper_layer_group", "resolve_layers", "spec_json_schema"]
