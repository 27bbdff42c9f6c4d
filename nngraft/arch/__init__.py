"""Architecture knowledge: where each component lives in a Hugging Face model, and how.

The adapter table (one :class:`Adapter` per ``model_type``: where components live, which are fused)
lives in :mod:`nngraft.arch.adapters`; the table of module kinds (linear, Conv1D, embedding, norm:
how each applies, ships, slices and counts its weights) in :mod:`nngraft.arch.kinds`. This package
re-exports their public names. Nothing outside ``nngraft.arch`` asks which architecture a model is,
or which class a module is.

Example:
    >>> from nngraft.arch import adapter_for_model_type
    >>> adapter_for_model_type("llama").layers_path
    'model.layers'
"""

from .adapters import (ADAPTERS, CHECKPOINT_RENAMES, COMPUTATION_CONFIG_KEYS, Adapter, FusedLayout, Site, adapter_for, adapter_for_model_type,
                       adapters_markdown, checkpoint_prefixes, fused_features, get_module, output_axis,
                       register_adapter, stores_weight_in_out, tied_alternatives)

__all__ = ["ADAPTERS", "CHECKPOINT_RENAMES", "COMPUTATION_CONFIG_KEYS", "Adapter", "FusedLayout", "Site", "adapter_for", "adapter_for_model_type",
           "adapters_markdown", "checkpoint_prefixes", "fused_features", "get_module", "output_axis",
           "register_adapter", "stores_weight_in_out", "tied_alternatives", "KINDS", "ModuleKind", "feature_axes",
           "kind_of"]
