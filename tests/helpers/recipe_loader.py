"""Import a script from recipes/ as a module (recipes import their neighbour ``_common``, so the
folder is on ``sys.path`` while the script loads)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def load_recipe(name: str) -> ModuleType:
    """``recipes/NAME.py`` as a fresh module (its ``main(argv)`` is the command line)."""
    sys.path.insert(0, str(RECIPES))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RECIPES))
    return module
