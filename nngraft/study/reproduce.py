"""``nngraft reproduce BUNDLE``: rerun a bundled run (:mod:`nngraft.study.bundle`) on this machine
and compare it, row by row, with the rows in the bundle.

P is loaded by the source the run recorded (``--model`` overrides it), F from the bundle when it
was packed, else from its recorded source (``--donor`` overrides both). Each model is checked
against the weights fingerprint the run recorded before any row is computed (a LoRA adapter by
its own tensors), and a mismatch is refused (:class:`~nngraft.study.bundle.FingerprintMismatchError`).
The rows are recomputed with the run's specs (their JSON), its examples (prompts, spans, answers),
batch size, top-k list and metrics, through the same sweep code, so on the same machine and
software they come out bit-identical.

**Tolerance.** A row matches when every number of it is within ``atol + rtol·|recorded|`` of the
recorded one, and every integer, flag and token (target id, rank, top-k hits, foil) is equal.
float32 defaults: ``atol = rtol = 1e-5``. The same command on the same machine is bit-identical
(batches are a fixed function of the rows); another CPU kernel path, thread count or library
version adds float32 products in another order, and a run over a subset of the specs batches rows
differently: both move probabilities by about 1e-6 (docs/study.md), an order of magnitude inside
the tolerance, while a real change (another F, spec or prompt) moves them by far more. Half
precision rounds at about 1e-2, so bfloat16/float16 runs default to ``atol = rtol = 2e-2`` (the
baseline check's tolerance). ``recovery`` (a ratio that divides by F − P, unstable where F ≈ P) and
the rounded display columns ``top_tokens``/``top_probs`` are not compared.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .bundle import Bundle, BundleError, FingerprintMismatchError, open_bundle

NOT_COMPARED = frozenset({"recovery", "top_tokens", "top_probs"})
"""Row columns a reproduction does not compare (see the module docstring)."""
KEY_COLUMNS = ("model", "spec", "example")
TOLERANCES = {"float32": (1e-5, 1e-5), "half": (2e-2, 2e-2)}
"""(atol, rtol) by the run's dtype."""


def default_tolerance(dtype: str | None) -> tuple[float, float]:
    """``(atol, rtol)`` for rows computed in ``dtype`` (see the module docstring).

    Example:
        >>> default_tolerance("float32"), default_tolerance("bfloat16")
        ((1e-05, 1e-05), (0.02, 0.02))
    """
    return TOLERANCES["float32" if dtype in (None, "float32", "auto") else "half"]


def compare_rows(recorded: dict[str, Any], now: dict[str, Any] | None, atol: float, rtol: float) -> dict[str, Any]:
    """One row's verdict: ``identical`` (every compared value equal), ``within`` (numbers within
    tolerance), ``mismatch`` (with the columns that differ) or ``missing`` (not recomputed).

    Example:
        >>> compare_rows({"prob": 0.5, "rank": 3}, {"prob": 0.5 + 1e-7, "rank": 3}, 1e-5, 1e-5)["status"]
        'within'
        >>> compare_rows({"prob": 0.5, "rank": 3}, {"prob": 0.5, "rank": 4}, 1e-5, 1e-5)["mismatched"]
        [{'column': 'rank', 'recorded': 3, 'now': 4}]
    """
    verdict: dict[str, Any] = {k: recorded.get(k) for k in KEY_COLUMNS}
    if now is None:
        return {**verdict, "status": "missing", "max_abs_diff": None, "mismatched": []}
    worst, mismatched, identical = 0.0, [], True
    for column, value in recorded.items():
        if column in NOT_COMPARED or column in KEY_COLUMNS or isinstance(value, (list, dict)):
            continue
        other = now.get(column)
        if isinstance(value, float) and isinstance(other, (int, float)) and not isinstance(other, bool):
            if math.isnan(value) and math.isnan(other):
                continue
            diff = abs(float(other) - value)
            if diff != 0:
                identical = False
            if math.isfinite(diff):
                worst = max(worst, diff)
            if not diff <= atol + rtol * abs(value):
                mismatched.append({"column": column, "recorded": value, "now": other, "abs_diff": diff})
        elif value != other:
            identical = False
            mismatched.append({"column": column, "recorded": value, "now": other})
    status = "mismatch" if mismatched else ("identical" if identical else "within")
    return {**verdict, "status": status, "max_abs_diff": worst, "mismatched": mismatched}


def environment_differences(recorded: dict[str, Any], here: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [the run's value, this machine's]}`` for every version or setting that differs."""
    keys = list(dict.fromkeys([*recorded, *here]))
    return {k: [recorded.get(k), here.get(k)] for k in keys if recorded.get(k) != here.get(k)}


@dataclass
class Reproduction:
    """What ``nngraft reproduce`` found (:meth:`to_json` is the JSON report)."""

    bundle: str
    atol: float
    rtol: float
    rows: list[dict[str, Any]]
    environment: dict[str, list[Any]]
    models: dict[str, Any]
    changed_files: list[str]
    extra_rows: int = 0
    rerun: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out = {"rows": len(self.rows), "identical": 0, "within": 0, "mismatch": 0, "missing": 0}
        for row in self.rows:
            out[row["status"]] += 1
        return out

    @property
    def ok(self) -> bool:
        counts = self.counts
        return counts["mismatch"] == 0 and counts["missing"] == 0 and counts["rows"] > 0

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "ok": self.ok, "counts": self.counts,
                "tolerance": {"atol": self.atol, "rtol": self.rtol, "rule": "|now - recorded| <= atol + rtol * "
                              "|recorded| for numbers; equality for ids, ranks, flags and tokens; not compared: "
                              + ", ".join(sorted(NOT_COMPARED))},
                "environment_differences": self.environment, "models": self.models,
                "changed_since_bundling": self.changed_files, "rows_not_in_bundle": self.extra_rows,
                "rerun": self.rerun, "notes": self.notes, "rows": self.rows}


def _pair_config(name: str, identity: dict[str, Any], entry: dict[str, Any] | None, bundle: Bundle, *,
                 model: str | None, donor: str | None, device: str) -> dict[str, Any]:
    """The sweep's model pair for one bundled model: P by its recorded source (or ``model``), F
    packed, or by its recorded source (or ``donor``)."""
    entry = entry or {}
    dtype = entry.get("dtype") or identity.get("recipient", {}).get("dtype") or "float32"
    if entry.get("tiny"):
        if model or donor:
            raise BundleError(f"model {name!r} of this bundle is a tiny test model (nngraft.testing), rebuilt "
                              "here from its seed; --model and --donor do not apply")
        return {"name": name, "tiny": entry["tiny"], "tiny_layers": entry.get("tiny_layers", 2), "dtype": dtype,
                "device": device}
    recipient = model or identity.get("recipient", {}).get("source")
    if not model and _missing_path(recipient):
        raise BundleError(f"P of model {name!r} was loaded from {recipient}, which is not on this machine; give "
                          "--model PATH (or the hub id) of that model: it is checked against the recorded "
                          "weights fingerprint before anything runs")
    packed = bundle.donor_folder(name)
    f_source = donor or (str(packed) if packed else identity.get("donor", {}).get("source"))
    if not donor and not packed and _missing_path(f_source):
        why = bundle.record.get("models", {}).get(name, {}).get("donors", {}).get("donor", {}).get("why", "")
        raise BundleError(f"F of model {name!r} is not in the bundle ({why}) and its recorded source {f_source} is "
                          "not on this machine; give --donor PATH (a copy of that F): it is checked against the "
                          "recorded weights fingerprint before anything runs")
    named = {}
    for key, ident in identity.get("donors", {}).items():
        folder = bundle.donor_folder(name, f"donor:{key}")
        named[key] = str(folder) if folder else ident.get("source")
    out = {"name": name, "recipient": recipient, "donor": f_source, "dtype": dtype, "device": device}
    if named:
        out["donors"] = named
    return out


def _missing_path(source: str | None) -> bool:
    """A recorded source that names a local path (absolute, or with a separator) that is not here."""
    if not source:
        return True
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith(".") or (source.count("/") > 1)
    return looks_local and not path.exists()


def _fingerprint_check(manifest: dict[str, Any], given: dict[str, dict[str, str | None]]) -> Any:
    """``on_loaded`` for :func:`~nngraft.study.sweep.run_sweep`: refuse a P or F whose fingerprint is
    not the recorded one; record what was verified in ``verified``."""
    verified: dict[str, Any] = {}

    def check(pair: Any) -> None:
        recorded = manifest["models"][pair.name]
        sides = [("P", recorded.get("recipient", {}), pair.identity["recipient"], "--model"),
                 ("F", recorded.get("donor", {}), pair.identity["donor"], "--donor")]
        sides += [(f"donor {k!r}", v, pair.identity.get("donors", {}).get(k, {}), "the bundle")
                  for k, v in recorded.get("donors", {}).items()]
        result = {}
        for what, before, now, flag in sides:
            key = "adapter_fingerprint" if before.get("adapter_fingerprint") else "weights_fingerprint"
            want, got = before.get(key), now.get(key)
            kind = "LoRA adapter fingerprint" if key == "adapter_fingerprint" else "weights fingerprint"
            if want is None:
                result[what] = {"checked": False, "why": "the run recorded no fingerprint"}
                continue
            if got != want:
                where = given.get(pair.name, {}).get(what)
                raise FingerprintMismatchError(
                    f"{what} of model {pair.name!r} ({now.get('source')}) is not the model this run used: its {kind} "
                    f"is {str(got)[:16]}…, the bundle records {want[:16]}… (the run loaded it from "
                    f"{before.get('source')}). Nothing was computed. "
                    + (f"Give {flag} the model the run used." if where else
                       f"The copy here differs from the one the run used; give {flag} PATH to the right one."))
            result[what] = {"checked": True, "fingerprint": key, "value": want, "source": now.get("source")}
        verified[pair.name] = result

    check.verified = verified  # type: ignore[attr-defined]
    return check


def reproduce(bundle_path: str | Path, *, model: str | None = None, donor: str | None = None, device: str = "auto",
              output: str | Path | None = None, atol: float | None = None, rtol: float | None = None,
              show_progress: bool = True, console: Any = None) -> Reproduction:
    """Rerun the bundle at ``bundle_path`` here and compare each row (see the module docstring)."""
    from rich.console import Console

    from ..spec import GraftSpec
    from .provenance import environment_versions
    from .results import load_results
    from .sweep import run_sweep
    from .sweep_config import SweepConfig

    console = console or Console(stderr=True)
    scratch = None
    if output is None:
        scratch = tempfile.TemporaryDirectory(prefix="nngraft-reproduce-")
        work = Path(scratch.name)
    else:
        work = Path(output).expanduser()
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise BundleError(f"{work} exists and is not an empty folder; give a new folder to -o")
    try:
        bundle = open_bundle(bundle_path, work / "bundle")
        manifest = json.loads((bundle.run / "manifest.json").read_text(encoding="utf-8"))
        recorded_rows = list(load_results(bundle.run / "results.jsonl"))
        if not recorded_rows:
            raise BundleError(f"{bundle_path} holds no result rows to reproduce")
        settings = manifest.get("sweep") or {**manifest.get("rerun", {}), "models": []}
        names = list(dict.fromkeys(r["model"] for r in recorded_rows))
        unknown = [n for n in names if n not in manifest.get("models", {})]
        if unknown:
            raise BundleError(f"{bundle_path}: rows of model(s) {unknown} that the manifest does not describe")
        if (model or donor) and len(names) > 1:
            raise BundleError(f"this bundle holds {len(names)} model pairs ({', '.join(names)}); --model and --donor "
                              "apply to a bundle of one")
        entries = {m.get("name"): m for m in settings.get("models", [])}
        pairs = [_pair_config(n, manifest["models"][n], entries.get(n), bundle, model=model, donor=donor,
                              device=device) for n in names]
        spec_names = list(dict.fromkeys(r["spec"] for r in recorded_rows))
        missing_specs = [s for s in spec_names if s not in manifest.get("specs", {})]
        if missing_specs:
            raise BundleError(f"{bundle_path}: rows of spec(s) {missing_specs} whose JSON the manifest does not hold")
        spec_dir = work / "specs"
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec_files = []
        for i, name in enumerate(s for s in manifest["specs"] if s in spec_names):  # the run's order
            spec = GraftSpec.model_validate(manifest["specs"][name]["spec"])
            spec_files.append(str(spec.save(spec_dir / f"{i:03d}.json")))
        from .examples import load_examples_jsonl, save_examples_jsonl

        wanted = {r["example"] for r in recorded_rows}
        examples = [e for e in load_examples_jsonl(bundle.run / "examples.jsonl") if e.key in wanted]
        lost = wanted - {e.key for e in examples}
        if lost:
            raise BundleError(f"{bundle_path}: rows of example(s) {sorted(lost)[:3]} that examples.jsonl does not hold")
        data_file = save_examples_jsonl(examples, work / "examples.jsonl")
        raw = {"name": "reproduce", "models": pairs, "data": {"examples": str(data_file)}, "specs": spec_files,
               "batch_size": settings.get("batch_size", 32), "backend": "local",
               "ks": settings.get("ks", [1, 5, 10, 100]), "n_top": settings.get("n_top", 10),
               "check_baselines": settings.get("check_baselines", 8),
               "answer_logprob": settings.get("answer_logprob", False), "metrics": settings.get("metrics", [])}
        config = SweepConfig.model_validate(raw)  # a module:function metric is refused: a bundle is data
        given = {n: {"P": model, "F": donor} for n in names}
        check = _fingerprint_check(manifest, given)
        outcome = run_sweep(config, output=work / "rerun", show_progress=show_progress, console=console,
                            on_loaded=check)
        now = {tuple(r[k] for k in KEY_COLUMNS): r for r in load_results(outcome.results)}
        dtypes = {manifest["models"][n].get("recipient", {}).get("dtype") for n in names}
        d_atol, d_rtol = default_tolerance("float32" if dtypes <= {"float32", None} else "bfloat16")
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
        verdicts = [compare_rows(r, now.get(tuple(r[k] for k in KEY_COLUMNS)), atol, rtol) for r in recorded_rows]
        seen = {tuple(r[k] for k in KEY_COLUMNS) for r in recorded_rows}
        notes = []
        for name, check_report in outcome.baseline_check.items():
            if not check_report.get("ok", True):
                notes.append(f"the rerun's baseline check failed for {name}: its p/f rows differ from plain "
                             f"forwards of P/F ({check_report})")
        if settings.get("backend", "local") != "local":
            notes.append(f"the run used backend {settings.get('backend')!r}; it was reproduced locally")
        report = Reproduction(
            bundle=str(bundle_path), atol=atol, rtol=rtol, rows=verdicts,
            environment=environment_differences(manifest.get("versions", {}), environment_versions()),
            models=check.verified, changed_files=bundle.changed, extra_rows=len(set(now) - seen),
            rerun=str(outcome.output) if scratch is None else None, notes=notes)
        if scratch is None:
            from ..util.io import atomic_write_text

            atomic_write_text(work / "report.json", json.dumps(report.to_json(), indent=2, default=str) + "\n")
        return report
    finally:
        if scratch is not None:
            scratch.cleanup()


def spec_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, spec): rows, identical, within tolerance, mismatched, missing, largest |Δ|."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        g = groups.setdefault((row["model"], row["spec"]), {"model": row["model"], "spec": row["spec"], "rows": 0,
                                                            "identical": 0, "within": 0, "mismatch": 0,
                                                            "missing": 0, "max_abs_diff": 0.0})
        g["rows"] += 1
        g[row["status"]] += 1
        if row["max_abs_diff"] is not None:
            g["max_abs_diff"] = max(g["max_abs_diff"], row["max_abs_diff"])
    return list(groups.values())


def report_tables(report: Reproduction, *, all_rows: bool = False, limit: int = 30) -> list[Any]:
    """The rich tables ``nngraft reproduce`` prints: per spec, the rows that did not match (all rows
    with ``all_rows``), and the environment differences."""
    from rich.table import Table

    counts = report.counts
    verdict = "[green]every row matches[/green]" if report.ok else "[red]rows differ[/red]"
    per_spec = Table(title=f"nngraft reproduce: {verdict} ({counts['identical']} identical, {counts['within']} "
                           f"within tolerance, {counts['mismatch']} mismatched, {counts['missing']} missing; "
                           f"tolerance atol {report.atol:g} + rtol {report.rtol:g}·|value|)")
    for column in ("model", "spec", "rows", "identical", "within tol.", "mismatched", "missing", "max |Δ|"):
        per_spec.add_column(column, justify="left" if column in ("model", "spec") else "right")
    for g in spec_summary(report.rows):
        style = "red" if g["mismatch"] or g["missing"] else None
        per_spec.add_row(g["model"], g["spec"], str(g["rows"]), str(g["identical"]), str(g["within"]),
                         str(g["mismatch"]), str(g["missing"]), f"{g['max_abs_diff']:.2e}", style=style)
    tables: list[Any] = [per_spec]
    shown = [r for r in report.rows if all_rows or r["status"] in ("mismatch", "missing")]
    if shown:
        rows = Table(title="rows" if all_rows else f"rows that do not match ({len(shown)})")
        for column in ("model", "spec", "example", "status", "max |Δ|", "what differs"):
            rows.add_column(column)
        for r in shown[: None if all_rows else limit]:
            what = "; ".join(f"{m['column']}: {m['recorded']!r} → {m['now']!r}" for m in r["mismatched"][:3])
            rows.add_row(r["model"], r["spec"], r["example"], r["status"],
                         "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}", what,
                         style="red" if r["status"] in ("mismatch", "missing") else None)
        if not all_rows and len(shown) > limit:
            rows.caption = f"… {len(shown) - limit} more in the JSON report (--json, or -o DIR: report.json)"
        tables.append(rows)
    env = Table(title="environment: the run's versions → this machine's" if report.environment else
                "environment: the same versions as the run")
    env.add_column("what")
    env.add_column("the run")
    env.add_column("here")
    for key, (before, here) in report.environment.items():
        env.add_row(key, str(before), str(here))
    tables.append(env)
    return tables
