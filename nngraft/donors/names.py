"""Names that stand for a model a package provides (``"smollm2"``): a registry the model resolver
(:func:`nngraft.donors.loading.resolve_model`) consults, so the core knows no particular model.

A package registers its names when it is imported (the study registers ``smollm2``,
``smollm2-135m`` and ``smollm2-135m-instruct`` in :mod:`nngraft.study.smollm2`), or declares them
as an entry point of the group ``nngraft.models`` (a module that registers on import), which the
resolver loads the first time it meets a name it does not know.

Example:
    >>> from pathlib import Path
    >>> register_model_name(["my-model"], lambda cache=None, console=None: Path("/models/mine"), origin="mine")
    >>> named_model("My-Model")[0], named_model("My-Model")[1]()
    ('mine', PosixPath('/models/mine'))
    >>> del MODEL_NAMES["my-model"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

Locate = Callable[..., Path]
"""``locate(cache=None, console=None)`` → the Hugging Face folder the name stands for (converted,
downloaded or found on first use)."""

MODEL_NAMES: dict[str, tuple[str, Locate]] = {}
"""Lower-cased name → (origin, locate); ``origin`` is what :class:`~nngraft.donors.loading.ModelSource`
records as how the model was found."""

ENTRY_POINT_GROUP = "nngraft.models"
_discovered = False


def register_model_name(names: Iterable[str], locate: Locate, *, origin: str) -> None:
    """Let every model name resolver accept ``names`` (case-insensitive) for the folder ``locate`` gives."""
    for name in names:
        MODEL_NAMES[name.lower()] = (origin, locate)


def named_model(name: str) -> tuple[str, Locate] | None:
    """``(origin, locate)`` of a registered name, else ``None``; an unknown name loads the
    ``nngraft.models`` entry points first (once)."""
    global _discovered
    key = name.lower()
    if key not in MODEL_NAMES and not _discovered:
        _discovered = True
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()  # the module registers its names on import
            except ImportError:  # a package that is not importable here declares no name
                continue
    return MODEL_NAMES.get(key)
