"""Argument checks at the public API's edge, with pydantic-style messages.

Each check raises :class:`~nngraft.errors.ArgumentError` naming the function, the argument, what
it should be and the value received, so a wrong call fails before any model runs:

    >>> positive_int("Grafter.generate", "max_new_tokens", 0)
    Traceback (most recent call last):
    ...
    nngraft.errors.ArgumentError: Grafter.generate: max_new_tokens: Input should be an integer >= 1, got 0 (int)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ArgumentError


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def fail(where: str, name: str, should: str, value: Any) -> ArgumentError:
    """The error for argument ``name`` of ``where``: ``Input should be {should}, got {value}``."""
    return ArgumentError(f"{where}: {name}: Input should be {should}, got {_shown(value)}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int in Python, never a count here)."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(where: str, name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> Any:
    """``value`` if it is an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not is_int(value) or value < minimum:
        raise fail(where, name, f"an integer >= {minimum}" + (" or None" if optional else ""), value)
    return int(value)


def number(where: str, name: str, value: Any, *, minimum: float = 0.0, optional: bool = False) -> Any:
    """``value`` if it is a finite real number >= ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise fail(where, name, f"a finite number >= {minimum:g}" + (" or None" if optional else ""), value)
    return value


def positive_number(where: str, name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is a finite real number > 0 (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise fail(where, name, "a finite number > 0" + (" or None" if optional else ""), value)
    return value


def text(where: str, name: str, value: Any, *, optional: bool = False, url: bool = False) -> Any:
    """``value`` if it is a non-empty string without surrounding blanks (or ``None`` when
    ``optional``); with ``url``, one that starts with ``http://`` or ``https://``."""
    if value is None and optional:
        return None
    what = "an http:// or https:// URL" if url else "a non-empty string"
    if not isinstance(value, str) or not value or value != value.strip() or (
            url and not value.startswith(("http://", "https://"))):
        raise fail(where, name, what + (" or None" if optional else ""), value)
    return value


def float_dtype(where: str, name: str, value: Any) -> Any:
    """``value`` if it is a floating torch dtype, or ``None``."""
    import torch

    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise fail(where, name, "a floating torch dtype (torch.float32, torch.bfloat16 …) or None", value)
    return value


def _int_arg(text: str, minimum: int, why: str = "") -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"should be an integer >= {minimum}, got {value}{why.format(-value)}")
    return value


def positive_int_arg(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--k 0`` is a usage error, not an empty column)."""
    return _int_arg(text, 1)


def seed_arg(text: str) -> int:
    """An ``argparse`` type: a seed, an integer >= 0 (Python's ``random`` seeds -5 like 5, so a
    negative seed would silently repeat another seed's data)."""
    return _int_arg(text, 0, " (a negative seed draws the same data as {})")


def positive_number_arg(text: str) -> float:
    """An ``argparse`` type: a finite number > 0 (``--limit-mb -1`` is a usage error)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"should be a number > 0, got {text}")
    return value


def non_negative_number_arg(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0 (a tolerance: 0 asks for equality)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"should be a number >= 0, got {text}")
    return value


def flag(where: str, name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise fail(where, name, "True or False", value)
    return value


def prompts(where: str, value: Any) -> list[str]:
    """A list of prompt strings (one string is one prompt); each non-empty."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise fail(where, "prompts", "a string or a list of strings", value)
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise fail(where, f"prompts[{i}]", "a string", item)
        if not item:
            raise fail(where, f"prompts[{i}]", "a non-empty string", item)
    return items


def spans(where: str, value: Any, n_prompts: int) -> Any:
    """``None``, or one mapping of span name → text (or ``(start, end)`` characters) per prompt."""
    if value is None:
        return None
    if isinstance(value, Mapping) and n_prompts == 1:
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise fail(where, "spans", "a list with one {span name: text} dict per prompt", value)
    if len(value) != n_prompts:
        raise ArgumentError(f"{where}: spans: Input should have one dict per prompt ({n_prompts}), "
                            f"got {len(value)}")
    for i, item in enumerate(value):
        if item is None:
            continue
        if not isinstance(item, Mapping):
            raise fail(where, f"spans[{i}]", "a dict of span name → text", item)
        for key, text in item.items():
            if not isinstance(key, str) or not key:
                raise fail(where, f"spans[{i}] key", "a non-empty string (the span's name)", key)
            if isinstance(text, str):
                if not text:
                    raise fail(where, f"spans[{i}][{key!r}]", "a non-empty text", text)
                continue
            if isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)) and len(text) == 2 and all(
                    is_int(t) for t in text):
                continue
            raise fail(where, f"spans[{i}][{key!r}]", "the span's text (a non-empty string) or a (start, end) "
                       "character range", text)
    return value


def positive_from_environment(where: str, variable: str, default: float, unit: str, argument: str) -> float:
    """The environment variable ``variable`` as a finite number > 0 (``default`` when unset), or an
    :class:`~nngraft.errors.ArgumentError` naming it and the ``argument`` that overrides it."""
    import os

    given = os.environ.get(variable)
    if given is None:
        return default
    try:
        value = float(given)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ArgumentError(f"{where}: the environment variable {variable} should be a number of {unit} > 0, got "
                            f"{given!r}; fix or unset it, or pass {argument}=")
    return value
