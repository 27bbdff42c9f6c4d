"""What a run records about where its numbers came from, so that they can be checked and rerun
elsewhere: the models (:func:`model_identity`: source, Hub revision, a fingerprint of every weight),
the software and machine (:func:`environment_versions`, with nngraft's git commit), F's own finetune
manifest and adapter fingerprint (:func:`donor_provenance`), and the test examples (with their spans
and answers) in ``examples.jsonl`` beside ``results.jsonl`` (:func:`save_run_examples`).

:func:`nngraft.study.pairs.load_pair` records the identities and the donor's provenance; the sweep
and the demo write the environment and the examples into their run folders.
(``nngraft.study.models``, which held the first half before 0.2, is an old path of this module.)

Example:
    >>> import tempfile
    >>> from nngraft.study.examples import TestExample
    >>> ex = TestExample("f1", "t", "Ada stars in X alongside", {"first_actor": "Ada"}, "Alan")
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_run_examples(folder, [ex]).name
    'examples.jsonl'
    >>> [e.spans for e in load_run_examples(folder)]
    [{'first_actor': 'Ada'}]
"""


from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from ..donors.loading import weights_fingerprint
from .examples import TestExample, load_examples_jsonl, save_examples_jsonl

EXAMPLES_FILE = "examples.jsonl"
"""The run's test examples (fact_id, template, prompt, spans, answer), one a line, beside results.jsonl."""

FINETUNE_MANIFEST = "finetune-manifest.json"
"""What ``nngraft finetune`` (and the demo's finetune) writes beside F's weights."""


FINGERPRINT_VERSION = 2
"""How ``weights_fingerprint`` is computed: 2 = sha256 over every byte of every state-dict tensor
(:func:`~nngraft.donors.loading.weights_fingerprint`); 1 (manifests without ``fingerprint_version``) hashed
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


PACKAGES = ("nngraft", "torch", "transformers", "nnsight", "pydantic", "peft", "accelerate", "safetensors", "gguf",
            "numpy", "huggingface-hub", "tokenizers")
"""The packages whose versions a manifest records (:func:`environment_versions`)."""


def environment_versions() -> dict[str, str]:
    """What a manifest records about the software and machine a result came from: Python, the
    platform, nngraft and its git commit (:func:`nngraft_commit`),
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
    out["nngraft_commit"] = nngraft_commit()
    out["threads"] = str(torch.get_num_threads())
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's kernel path (ATEN_CPU_CAPABILITY)
    out["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    return out


@functools.lru_cache(maxsize=1)
def nngraft_commit() -> str:
    """The git commit nngraft runs from: ``git rev-parse HEAD`` of the checkout holding this
    package (``+dirty`` when tracked files differ from it), else the commit pip recorded for an
    install from a git URL, else ``"unknown"`` (an install from a wheel or an sdist)."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists() and (root / "pyproject.toml").is_file():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            if head.returncode == 0 and head.stdout.strip():
                dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10)
                return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    import importlib.metadata as md

    try:
        raw = md.distribution("nngraft").read_text("direct_url.json")
        commit = json.loads(raw).get("vcs_info", {}).get("commit_id") if raw else None
    except (md.PackageNotFoundError, ValueError, AttributeError):
        commit = None
    return str(commit) if commit else "unknown"


def adapter_weights_file(folder: Path) -> Path | None:
    """The ``.safetensors`` file of a PEFT adapter folder, or ``None`` when ``folder`` is not one."""
    if not (folder / "adapter_config.json").is_file():
        return None
    found = folder / "adapter_model.safetensors"
    return found if found.is_file() else next(iter(sorted(folder.glob("*.safetensors"))), None)


def adapter_fingerprint(folder: str | Path) -> str | None:
    """:func:`~nngraft.donors.loading.tensors_fingerprint` of a LoRA adapter's tensors (as saved:
    A and B, not merged into P), or ``None`` when ``folder`` is not an adapter folder. The merged F
    is a product ``W + s·B·A`` whose last bits may depend on the CPU's kernels; the adapter's own
    tensors do not."""
    from safetensors.torch import load_file

    from ..donors.loading import tensors_fingerprint

    weights = adapter_weights_file(Path(folder))
    return tensors_fingerprint(load_file(str(weights))) if weights is not None else None


def donor_provenance(source: str | Path) -> dict[str, Any]:
    """What F's folder says of itself, for the manifest: ``finetune_manifest`` (recipe, data hash,
    seed, history: what ``nngraft finetune`` wrote beside the weights) and, for a LoRA adapter,
    ``adapter_fingerprint``. Empty for hub ids, files and folders without either."""
    folder = Path(source)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return {}
    record: dict[str, Any] = {}
    manifest = folder / FINETUNE_MANIFEST
    if manifest.is_file():
        try:
            record["finetune_manifest"] = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            record["finetune_manifest"] = {"unreadable": f"{manifest}: {error}"}
    fingerprint = adapter_fingerprint(folder)
    if fingerprint is not None:
        record["adapter_fingerprint"] = fingerprint
    return record


def save_run_examples(folder: str | Path, examples: Sequence[TestExample]) -> Path:
    """Write the run's test examples to ``folder/examples.jsonl``, keeping those an earlier run into
    the same folder recorded (a resumed or extended run adds its new ones; rows of both stay
    rerunnable)."""
    path = Path(folder) / EXAMPLES_FILE
    merged: dict[str, TestExample] = {}
    if path.is_file():
        try:
            merged = {e.key: e for e in load_examples_jsonl(path)}
        except Exception:  # noqa: BLE001 - an unreadable old file is replaced by this run's
            merged = {}
    for example in examples:
        merged[example.key] = example
    return save_examples_jsonl(list(merged.values()), path)


def load_run_examples(folder: str | Path) -> list[TestExample]:
    """The test examples a run recorded (:func:`save_run_examples`)."""
    return load_examples_jsonl(Path(folder) / EXAMPLES_FILE)


def __getattr__(name: str) -> Any:
    """Names ``nngraft.study.models`` (an old path of this module) re-exported before 0.2 (deprecated)."""
    if name.startswith("__"):  # the import system's probes (__path__ …): not a moved name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..deprecated import moved_name

    return moved_name(__name__, name)
