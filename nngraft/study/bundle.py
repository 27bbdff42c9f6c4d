"""One file that holds a run: ``nngraft bundle RUN`` packs a results folder (what ``nngraft run``,
``nngraft sweep`` or ``nngraft demo`` wrote) with F's weights where F is small, and
``nngraft reproduce BUNDLE`` (:mod:`nngraft.study.reproduce`) reruns it elsewhere.

A bundle is a ``.zip`` (or ``.tar.gz``) holding::

    bundle.json              format, when and where it was made, every file's sha256, each model's
                             identity and where its F is (packed, or by reference)
    run/manifest.json        the run's records: manifest, results.jsonl, examples.jsonl, and the
    run/results.jsonl        folder's other .json/.jsonl/.txt/.csv files (plots are left out)
    run/examples.jsonl
    donors/MODEL/donor/…     F's files (top level of its folder) when packed

F is packed when it is a LoRA adapter, or its folder holds at most :data:`PACK_LIMIT_MB` MB
(``--pack-donor always`` / ``never`` overrides the rule); otherwise the bundle records F by
reference: its source (path or hub id), weights fingerprint and size. P is always by reference
(its source and fingerprint): it is the public base model, and ``reproduce`` loads it by name.

Example:
    >>> describe_size(3 * 1024 * 1024)
    '3.0 MB'
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from ..errors import GraftError

BUNDLE_FORMAT = "nngraft.bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"
PACK_LIMIT_MB = 100.0
"""F's folder is packed when it holds at most this many MB (a LoRA adapter always is): a 135M-parameter
float32 model (SmolLM2: 516 MB) travels by reference, an adapter of a few MB inside."""
RECORD_SUFFIXES = (".json", ".jsonl", ".txt", ".csv")
"""The files of a run folder a bundle packs (its records; plots are left out: ``nngraft plot`` redraws them)."""

PackRule = Literal["auto", "always", "never"]


class BundleError(GraftError, ValueError):
    """A run folder that cannot be bundled, or a file that is not a readable bundle."""


class FingerprintMismatchError(BundleError):
    """A model given for a rerun is not the one the bundled run used (its weights fingerprint differs)."""


def describe_size(n_bytes: int) -> str:
    return f"{n_bytes / 1024 / 1024:.1f} MB"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    """The top-level files of a model folder (a Hugging Face folder or an adapter is flat; a
    Trainer's checkpoint-* subfolders are not F)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def run_folder(run: str | Path) -> Path:
    """The results folder ``run`` names (the folder, or its results.jsonl / manifest.json), checked
    to hold what a bundle needs."""
    from .provenance import EXAMPLES_FILE
    from .results import MANIFEST_FILE, RESULTS_FILE

    path = Path(run).expanduser()
    folder = path.parent if path.is_file() and path.name in (RESULTS_FILE, MANIFEST_FILE) else path
    if not folder.is_dir():
        raise BundleError(f"{run}: no such run folder (give the folder nngraft run -o DIR, nngraft sweep or "
                          "nngraft demo --out wrote)")
    missing = [name for name in (RESULTS_FILE, MANIFEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"{folder} is not a run folder: it has no {' and no '.join(missing)} (give the folder "
                          "nngraft run -o DIR, nngraft sweep or nngraft demo --out wrote)")
    manifest = read_json(folder / MANIFEST_FILE, "the run's manifest")
    if manifest.get("format") != "nngraft.results":
        raise BundleError(f"{folder / MANIFEST_FILE} is not an nngraft results manifest")
    if not (folder / EXAMPLES_FILE).is_file() and "demo" in manifest:
        manifest = record_demo_examples(folder, manifest)
    if not (folder / EXAMPLES_FILE).is_file():
        how = ("rerun the same `nngraft demo` command" if "demo" in manifest else
               "rerun the same `nngraft run`/`nngraft sweep` command into it: every row is there already, so "
               "it only records the examples")
        raise BundleError(f"{folder} has no {EXAMPLES_FILE}: it was written by an nngraft older than bundles "
                          f"(which records each example's prompt, spans and answer there); {how}")
    if "sweep" not in manifest and "rerun" not in manifest:
        raise BundleError(f"{folder / MANIFEST_FILE} records neither the sweep nor the demo settings the rows "
                          "were computed with; rerun the command that made it with this nngraft")
    return folder


def record_demo_examples(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """A demo folder written before runs recorded their examples: its test examples are a function
    of the dataset's name, size and seed and the template, which its manifest holds; regenerate
    them and, when their hash is the one the manifest recorded, write ``examples.jsonl`` and the
    demo's ``rerun`` settings into the folder (nothing else changes). Returns the manifest."""
    from .data import make_facts, make_test_examples
    from .demo import rerun_settings
    from .examples import examples_hash
    from .provenance import save_run_examples
    from .results import write_manifest

    data = manifest.get("dataset", {})
    try:
        examples = make_test_examples(make_facts(data["name"], data["n"], seed=data["seed"]), data["template"])
    except (KeyError, TypeError, ValueError, GraftError):
        return manifest
    if examples_hash(examples) != data.get("hash"):
        return manifest
    save_run_examples(folder, examples)
    manifest = {**manifest, "rerun": manifest.get("rerun") or rerun_settings()}
    write_manifest(folder / "results.jsonl", manifest)
    return manifest


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise BundleError(f"{path} ({what}) is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path} ({what}) is not a JSON object")
    return value


@dataclass
class DonorPlan:
    """Where one F goes in a bundle: ``packed`` (its folder's files) or by reference."""

    model: str
    role: str  # "donor", or "donor:NAME" for a named donor
    source: str
    identity: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    size: int | None = None
    packed: bool = False
    why: str = ""

    def record(self) -> dict[str, Any]:
        keys = ("weights_fingerprint", "adapter_fingerprint", "config_hash", "dtype", "lora_adapter")
        out = {"source": self.source, **{k: self.identity[k] for k in keys if k in self.identity},
               "size_bytes": self.size, "packed": self.packed, "why": self.why}
        if self.packed:
            out["path"] = self.arc_folder()
        return out

    def arc_folder(self) -> str:
        return f"donors/{self.model}/{self.role.replace(':', '-')}"


def plan_donors(manifest: dict[str, Any], rule: PackRule = "auto", limit_mb: float = PACK_LIMIT_MB) -> list[DonorPlan]:
    """Decide, for every F of the run (each model pair's donor and named donors), whether it is
    packed (see the module docstring)."""
    plans = []
    tiny = {m.get("name") for m in manifest.get("sweep", {}).get("models", []) if m.get("tiny")}
    for model, identity in manifest.get("models", {}).items():
        donors = [("donor", identity.get("donor", {}))]
        donors += [(f"donor:{k}", v) for k, v in identity.get("donors", {}).items()]
        for role, ident in donors:
            plan = DonorPlan(model, role, str(ident.get("source")), ident)
            folder = Path(plan.source)
            if model in tiny:
                plan.why = "a tiny test model (rebuilt by nngraft.testing)"
            elif not folder.exists():
                plan.why = "not a local folder (a hub id or a named model): by reference"
            else:
                folder = folder if folder.is_dir() else folder.parent
                plan.files = _folder_files(folder)
                plan.size = sum(p.stat().st_size for p in plan.files)
                adapter = (folder / "adapter_config.json").is_file()
                small = plan.size <= limit_mb * 1024 * 1024
                if rule == "never":
                    plan.why = "--pack-donor never: by reference"
                elif rule == "always":
                    plan.packed, plan.why = True, "--pack-donor always"
                elif adapter:
                    plan.packed, plan.why = True, f"a LoRA adapter ({describe_size(plan.size)})"
                elif small:
                    plan.packed, plan.why = True, f"{describe_size(plan.size)} <= {limit_mb:g} MB"
                else:
                    plan.why = (f"{describe_size(plan.size)} > {limit_mb:g} MB: by reference "
                                "(--pack-donor always packs it)")
            plans.append(plan)
    return plans


@dataclass
class BundleOutcome:
    path: Path
    files: int
    size: int
    donors: list[DonorPlan]
    notes: list[str] = field(default_factory=list)


def default_output(folder: Path, suffix: str = ".zip") -> Path:
    return folder.parent / f"{folder.name}.bundle{suffix}"


def _archive_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    raise BundleError(f"{path}: a bundle is a .zip or a .tar.gz file; name it NAME.zip or NAME.tar.gz")


def make_bundle(run: str | Path, output: str | Path | None = None, *, pack_donor: PackRule = "auto",
                limit_mb: float = PACK_LIMIT_MB, overwrite: bool = False, console: Any = None,
                show_progress: bool = True) -> BundleOutcome:
    """Pack the run folder ``run`` into one file (see the module docstring); returns where."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from .provenance import EXAMPLES_FILE, environment_versions
    from .results import MANIFEST_FILE

    given = Path(run).expanduser()
    had_examples = (given if given.is_dir() else given.parent).joinpath(EXAMPLES_FILE).is_file()
    folder = run_folder(run)
    manifest = read_json(folder / MANIFEST_FILE, "the run's manifest")
    notes = [] if had_examples else [f"recorded {folder / EXAMPLES_FILE} and the demo's settings in its manifest "
                                     "(regenerated from the dataset's name, size and seed; their hash is the one "
                                     "the manifest recorded)"]
    out = Path(output).expanduser() if output is not None else default_output(folder)
    kind = _archive_kind(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; give another -o FILE, or --force to replace it")
    if out.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"{out} is inside the run folder {folder}; write the bundle elsewhere (-o FILE)")
    plans = plan_donors(manifest, pack_donor, limit_mb)
    members: list[tuple[Path, str]] = [(p, f"run/{p.name}") for p in sorted(folder.iterdir())
                                       if p.is_file() and p.suffix in RECORD_SUFFIXES]
    for plan in plans:
        if plan.packed:
            members += [(p, f"{plan.arc_folder()}/{p.name}") for p in plan.files]
    record = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": folder.name,
        "made_with": environment_versions(),
        "models": {},
        "files": {},
    }
    for model, identity in manifest.get("models", {}).items():
        record["models"][model] = {"recipient": {k: identity.get("recipient", {}).get(k) for k in
                                                 ("source", "weights_fingerprint", "config_hash", "dtype")},
                                   "donors": {p.role: p.record() for p in plans if p.model == model}}
    total = sum(p.stat().st_size for p, _ in members)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                      console=console, disable=not show_progress, transient=False) as bar:
            task = bar.add_task(f"bundling {len(members)} files", total=total)
            for path, arc in members:
                record["files"][arc] = _sha256(path)
            blob = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()
            if kind == "zip":
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
                    archive.writestr(BUNDLE_FILE, blob)
                    for path, arc in members:
                        archive.write(path, arc)
                        bar.advance(task, path.stat().st_size)
            else:
                with tarfile.open(tmp, "w:gz", compresslevel=6) as archive:
                    info = tarfile.TarInfo(BUNDLE_FILE)
                    info.size = len(blob)
                    archive.addfile(info, io.BytesIO(blob))
                    for path, arc in members:
                        archive.add(path, arc, recursive=False)
                        bar.advance(task, path.stat().st_size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return BundleOutcome(out, len(members), out.stat().st_size, plans, notes)


# ---------------------------------------------------------------------------------------------
# Reading a bundle
# ---------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """An unpacked bundle: its record (``bundle.json``) and the folder it was unpacked into."""

    root: Path
    record: dict[str, Any]
    changed: list[str]
    """Files whose sha256 differs from the one recorded when the bundle was made."""

    @property
    def run(self) -> Path:
        return self.root / "run"

    def donor_folder(self, model: str, role: str = "donor") -> Path | None:
        entry = self.record.get("models", {}).get(model, {}).get("donors", {}).get(role, {})
        return self.root / entry["path"] if entry.get("packed") else None


def _safe_names(names: Iterable[str], path: Path) -> None:
    for name in names:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise BundleError(f"{path}: member {name!r} would be written outside the folder it is unpacked "
                              "into; this is not a bundle nngraft made (refused)")


def open_bundle(path: str | Path, into: str | Path) -> Bundle:
    """Unpack the bundle ``path`` into the folder ``into`` (nothing is written outside it) and read
    its record; files whose hash changed since bundling are listed in ``Bundle.changed``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file (give the .zip or .tar.gz nngraft bundle wrote)")
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                _safe_names(archive.namelist(), path)
                archive.extractall(into)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as archive:
                _safe_names(archive.getnames(), path)
                archive.extractall(into, filter="data")
        else:
            raise BundleError(f"{path} is neither a zip nor a tar file: not a bundle nngraft bundle made")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        raise BundleError(f"{path} is a damaged archive ({error}); make the bundle again") from None
    if not (into / BUNDLE_FILE).is_file():
        raise BundleError(f"{path} holds no {BUNDLE_FILE}: not a bundle nngraft bundle made")
    record = read_json(into / BUNDLE_FILE, "the bundle's record")
    if record.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: {BUNDLE_FILE} is not an nngraft bundle record")
    if record.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path} is bundle version {record.get('version')!r}; this nngraft reads version "
                          f"{BUNDLE_VERSION} (upgrade nngraft)")
    changed = []
    for arc, digest in record.get("files", {}).items():
        _safe_names([arc], path)
        member = into / arc
        if not member.is_file():
            raise BundleError(f"{path}: {arc}, recorded in {BUNDLE_FILE}, is missing from the bundle")
        if _sha256(member) != digest:
            changed.append(arc)
    return Bundle(into, record, changed)
