"""Exceptions of the study (datasets, templates, examples files), on top of :mod:`nngraft.errors`.

They derive from :class:`~nngraft.errors.GraftError`, so ``except GraftError`` catches them too;
the command line reports them as user errors (one message, exit 2). (Before 0.2 they lived in
:mod:`nngraft.errors`; that name still works for one release, with a DeprecationWarning.)
"""

from __future__ import annotations

from ..errors import GraftError


class DataError(GraftError, ValueError):
    """A study dataset is malformed: a bad JSONL line, a duplicate id, a fact missing a field."""


class TemplateError(DataError):
    """A text template is malformed, or names a field that the facts do not have."""


class DataIntegrityError(DataError):
    """A saved dataset's content does not match the sha256 recorded in its manifest."""
