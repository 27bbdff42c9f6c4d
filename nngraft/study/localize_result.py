"""What a localization search returns and writes (``localize.json``): every step's candidates,
the recovery curve of the found set, and the found spec."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from ..spec import GLOBAL_COMPONENTS, GraftSpec
from .localize_units import Unit, rounded, layer_runs, metric_label
from .metrics import Estimate

FORMAT_VERSION = 1


@dataclass
class Candidate:
    """One unit set tried in a step: its label, size, metric mean and recovery."""

    label: str
    n_units: int
    recovery: float
    metric: float
    chosen: bool = False
    cached: bool = False


@dataclass
class Step:
    """One search step (one ``run_grid`` call, or none if every candidate was already known).

    ``n_units`` and ``recovery`` describe the kept set *after* the step; ``decision`` says what
    the step changed."""

    index: int
    stage: str
    kind: str
    candidates: list[Candidate]
    forward_passes: int
    rows: int
    n_units: int
    n_blocks: int
    recovery: float
    decision: str


@dataclass
class CurvePoint:
    """The found set grafted in part: its first ``n_units`` units (most important first)."""

    n_units: int
    added: str
    recovery: float
    heldout_recovery: float | None = None


def _estimate_dict(e: Estimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(e).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class LocalizeResult:
    """What :func:`localize` found, and how. ``save(folder)`` writes ``spec.json`` (the found spec,
    shareable), ``localize.json`` (everything below) and ``localize.png`` (the plot)."""

    spec: GraftSpec
    units: list[Unit]
    recovery: Estimate
    heldout_recovery: Estimate | None
    settings: dict[str, Any]
    baselines: dict[str, Any]
    data: dict[str, Any]
    steps: list[Step]
    curve: list[CurvePoint]
    forward_passes: int
    grid_calls: int
    candidates_evaluated: int
    rows: int
    seconds: float
    universe_units: int
    models: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    """P, F, FE+LT and the found set side by side (:func:`compare_with_fe_lt`), for the plot."""

    @property
    def reached(self) -> bool:
        """Whether the found set reaches the target on the search facts."""
        return self.recovery.mean >= self.settings["target"]

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (NaN written as ``null``). ``timing`` is the only
        entry that differs between two runs with the same inputs and seed."""
        return _clean({
            "format": "nngraft.localize",
            "format_version": FORMAT_VERSION,
            "spec": json.loads(self.spec.to_json()),
            "spec_hash": self.spec.content_hash(),
            "units": [list(u) for u in self.units],
            "n_units": len(self.units),
            "universe_units": self.universe_units,
            "reached": self.reached,
            "recovery": _estimate_dict(self.recovery),
            "heldout_recovery": _estimate_dict(self.heldout_recovery),
            "settings": self.settings,
            "baselines": self.baselines,
            "data": self.data,
            "models": self.models,
            "forward_passes": self.forward_passes,
            "grid_calls": self.grid_calls,
            "candidates_evaluated": self.candidates_evaluated,
            "rows": self.rows,
            "steps": [asdict(s) for s in self.steps],
            "curve": [asdict(c) for c in self.curve],
            "comparison": self.comparison,
            "timing": {"seconds": round(self.seconds, 3)},
        })

    def save(self, folder: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write ``spec.json``, ``localize.json`` and (with ``plot``) ``localize.png`` into
        ``folder`` (atomically). Returns their paths by kind."""
        from ..util.io import atomic_write_text

        folder = Path(folder)
        paths = {"spec": self.spec.save(folder / "spec.json")}
        data = self.to_dict()
        data["spec_file"] = "spec.json"
        paths["result"] = atomic_write_text(folder / "localize.json", json.dumps(data, indent=2) + "\n")
        if plot:
            from .localize_plot import plot_localize

            paths["plot"] = plot_localize(data, folder / "localize.png")
        return paths

    def __repr__(self) -> str:
        return (f"LocalizeResult({len(self.units)} of {self.universe_units} units, recovery {self.recovery.mean:.3f}, "
                f"spec {self.spec.name!r}, {self.forward_passes} forward passes)")

    def _repr_html_(self) -> str:
        """In Jupyter: the recovery, the found spec's rules, and P, F, FE+LT and the found set side by
        side (when compared)."""
        from ..util.html import html_table

        lines = self.summary().splitlines()
        rules = [[line.strip()] for line in lines[1:-1] if line.startswith("  ")]
        out = html_table(["found rules"], rules, caption=lines[0] + "; " + lines[-1])
        if self.comparison:
            out += html_table(["graft", "metric", "recovery"], [[c.get("name"), c.get("value"), c.get("recovery")]
                                                                 for c in self.comparison])
        return out

    def summary(self) -> str:
        """A few lines for humans: the spec's rules, recovery, cost."""
        rec = self.recovery
        lines = [f"found {len(self.units)} of {self.universe_units} units, recovery {rec.mean:.3f}"
                 + (f" [{rec.low:.3f}, {rec.high:.3f}]" if rec.method == "bootstrap" and not math.isnan(rec.low)
                    else "")
                 + f" of {metric_label(self.settings['metric'])} (target {self.settings['target']:g})"]
        if self.heldout_recovery is not None:
            h = self.heldout_recovery
            lines.append(f"held-out facts ({h.n}): recovery {rounded(h.mean)}"
                         + (f" [{h.low:.3f}, {h.high:.3f}]" if not math.isnan(h.low) else "")
                         + (f" ({h.note})" if h.note else ""))
        for rule in self.spec.rules:
            pos = ", ".join(json.dumps(p.model_dump(by_alias=True)) for p in rule.positions)
            layers = "" if set(rule.components) <= set(GLOBAL_COMPONENTS) else f" @ layers {layer_runs(rule.layers)}"
            lines.append(f"  {'+'.join(rule.components)}{layers} @ {pos}")
        lines.append(f"{self.forward_passes} forward passes in {self.grid_calls} batched steps, "
                     f"{self.candidates_evaluated} candidate sets, {self.rows} rows, {self.seconds:.1f} s")
        return "\n".join(lines)
