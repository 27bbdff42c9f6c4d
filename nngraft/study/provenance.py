"""What a run's folder records so that it can be rerun elsewhere (issue #25, part 2): nngraft's git
commit, F's own finetune manifest and adapter fingerprint, and the test examples (with their spans
and answers) in ``examples.jsonl`` beside ``results.jsonl``.

:func:`nngraft.study.models.environment_versions` records the package versions (it calls
:func:`nngraft_commit`); :func:`nngraft.study.pairs.load_pair` adds :func:`donor_provenance` to
F's identity; the sweep and the demo write :func:`save_run_examples`.

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
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

from .examples import TestExample, load_examples_jsonl, save_examples_jsonl

EXAMPLES_FILE = "examples.jsonl"
"""The run's test examples (fact_id, template, prompt, spans, answer), one a line, beside results.jsonl."""

FINETUNE_MANIFEST = "finetune-manifest.json"
"""What ``nngraft finetune`` (and the demo's finetune) writes beside F's weights."""


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
