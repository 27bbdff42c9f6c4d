"""What a manifest records about models and the machine: model identity (fingerprint, Hub
revision), the device, library versions. Loading models by name lives in :mod:`nngraft.donors.loading`
(this module re-exported its names before 0.2; ``nngraft.study.models.load_model`` and the others
still work for one release, with a DeprecationWarning, through :mod:`nngraft.deprecated`).

Example::

    from nngraft.donors.loading import load_model
    model, tokenizer = load_model("smollm2")
    model_identity(model)["n_layers"]  # 30
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import GraftError
from ..donors.loading import weights_fingerprint


FINGERPRINT_VERSION = 2
"""How ``weights_fingerprint`` is computed: 2 = sha256 over every byte of every state-dict tensor
(:func:`nngraft.study.models.weights_fingerprint`); 1 (manifests without ``fingerprint_version``) hashed
only each parameter's first 64 values, so two finetunes differing later in a tensor looked alike."""


def hub_revision(source: str) -> str | None:
    """The Hub commit a model was loaded from, read off its cache path (``…/snapshots/<commit>/``)
    without any network access; ``None`` for folders outside the Hub cache and for tiny models."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    local = Path(source)
    if local.exists():
        found: Any = str(local.absolute() / "config.json" if local.is_dir() else local.absolute())
    else:
        try:
            found = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id (e.g. a tiny test model's description)
            return None
    return extract_commit_hash(found, None) if isinstance(found, str) else None


def model_identity(model: torch.nn.Module, source: str | None = None) -> dict[str, Any]:
    """What identifies a loaded model (in sweep, finetune and demo manifests): its source (default:
    its config's ``_name_or_path``), the Hub revision (commit) it was loaded from
    (``None`` outside the Hub cache, e.g. tiny models), type, depth, a hash of its config, and a
    fingerprint of its weights: :func:`weights_fingerprint`, sha256 over every
    state-dict tensor's name, dtype, shape and bytes (``fingerprint_version`` 2). Computed once
    per model per sweep, when it is loaded: 0.3 s for SmolLM2-135M (651 MB in float32) on CPU."""
    config = model.config
    source = source if source is not None else (getattr(config, "_name_or_path", None) or type(model).__name__)
    config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
    n_params = sum(param.numel() for param in model.parameters())
    dtype = next(model.parameters()).dtype
    return {
        "source": source,
        "revision": hub_revision(source),
        "model_type": getattr(config, "model_type", None),
        "n_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "weights_fingerprint": weights_fingerprint(model),
        "fingerprint_version": FINGERPRINT_VERSION,
        "n_params": n_params,
        "dtype": str(dtype).replace("torch.", ""),
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a CUDA device without CUDA is a clear error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GraftError(f"unknown device {name!r}; use cpu, cuda, cuda:1 … or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraftError(f"--device {name}: this torch build has no usable CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GraftError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); use --device cpu or auto (or one of "
                         "those)")
    return device


PACKAGES = ("nngraft", "torch", "transformers", "nnsight", "pydantic", "peft", "accelerate", "safetensors", "gguf",
            "numpy", "huggingface-hub", "tokenizers")
"""The packages whose versions a manifest records (:func:`environment_versions`)."""


def environment_versions() -> dict[str, str]:
    """What a manifest records about the software and machine a result came from: Python, the
    platform, nngraft and its git commit (:func:`~nngraft.study.provenance.nngraft_commit`),
    the packages it runs on (:data:`PACKAGES`), torch's thread count, its CPU kernel path
    (``AVX512``, ``AVX2`` …: another one rounds differently) and OMP_WAIT_POLICY."""
    import importlib.metadata as md
    import platform

    from .. import __version__

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = __version__ if name == "nngraft" else "not installed"
    from .provenance import nngraft_commit

    out["nngraft_commit"] = nngraft_commit()
    out["threads"] = str(torch.get_num_threads())
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's kernel path (ATEN_CPU_CAPABILITY)
    out["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    return out


def __getattr__(name: str) -> Any:
    """Names of :mod:`nngraft.donors.loading` this module used to re-export (deprecated)."""
    if name.startswith("__"):  # the import system's probes (__path__ …): not a moved name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..deprecated import moved_name

    return moved_name(__name__, name)
