"""Helpers for nngraft's test suite and examples: the tiny random models of :mod:`nngraft.tiny`.

Example:
    >>> from nngraft.testing import tiny_pair
    >>> tiny_pair("llama")[0].config.model_type
    'llama'
"""

from .tiny import TINY_MODEL_TYPES, perturbed_copy, tiny_config, tiny_model, tiny_pair, tiny_tokenizer

__all__ = ["TINY_MODEL_TYPES", "perturbed_copy", "tiny_config", "tiny_model", "tiny_pair", "tiny_tokenizer"]
