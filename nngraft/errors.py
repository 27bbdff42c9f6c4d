"""Exceptions raised by nngraft.

Every error names the thing that is wrong (the rule, field, module or span) and, where there is
one, what to do about it. They all derive from :class:`GraftError`, so ``except GraftError``
catches anything nngraft raises on purpose.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error nngraft raises on purpose."""


class SpecError(GraftError, ValueError):
    """A graft spec is malformed, or does not fit the model it is applied to."""


class UnsupportedArchitectureError(GraftError, KeyError):
    """No adapter is registered for a model's ``model_type``.

    Example:
        >>> from nngraft.arch import adapter_for_model_type
        >>> adapter_for_model_type("my_arch")  # doctest: +SKIP
        UnsupportedArchitectureError: no nngraft adapter for model_type 'my_arch' ...
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ComponentNotFoundError(SpecError):
    """A spec names a component this architecture does not have (e.g. ``gate`` on GPT-2)."""


class LayerRangeError(SpecError):
    """A layer selection is out of range for the model's depth, or selects no layer."""


class PositionError(GraftError, ValueError):
    """A position selector cannot be resolved for a prompt (missing span, index out of range)."""


class SpanNotFoundError(PositionError):
    """A named span's text does not occur in the prompt."""


class DonorMismatchError(GraftError, ValueError):
    """The donor's weights do not fit the recipient (architecture, shape, or a missing tensor)."""


class SchemaVersionError(SpecError):
    """A spec was written by a newer nngraft than the one reading it."""


class DataError(GraftError, ValueError):
    """A study dataset is malformed: a bad JSONL line, a duplicate id, a fact missing a field."""


class TemplateError(DataError):
    """A text template is malformed, or names a field that the facts do not have."""


class DataIntegrityError(DataError):
    """A saved dataset's content does not match the sha256 recorded in its manifest."""
