"""Sweeps: model pair(s) × dataset × test templates × a grid of specs → results + manifest.

A sweep config is a small JSON file (``nngraft sweep CONFIG``)::

    {
      "name": "main-llama",
      "models": [{"name": "llama-3.2-1b", "recipient": "meta-llama/Llama-3.2-1B",
                  "donor": "runs/sft/llama-fmra", "dtype": "float32"}],
      "data": {"facts": "runs/sft/llama-fmra/facts.jsonl",
               "templates": ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]},
      "grid": "main",
      "lm_head": ["never"],
      "batch_size": 64,
      "output": "runs/main-llama"
    }

Relative paths are relative to the config file. ``grid`` names a paper grid
(:data:`nngraft.study.grids.PAPER_GRIDS`); ``specs`` adds spec files. The baselines ``p`` (no
graft) and ``f`` (everything grafted, = running F) are always added, because recovery needs them.

Every (spec, example) unit becomes one row of ``results.jsonl``. Rows of many specs and examples
share batched forward passes (rows sorted by prompt length, then cut into batches of
``batch_size``; each batch is one nnsight trace). Batches are a fixed function of the units, so an
interrupted sweep that is rerun computes the missing rows in exactly the same batches and gives
bit-identical numbers. Each finished batch is appended with flush + fsync.

After the run, the sweep runs P and F directly (no nngraft in the path) on the first
``check_baselines`` examples and records in the manifest how far the ``p`` and ``f`` rows are
from them (``baseline_check``); a gap above tolerance is reported as an error-level warning.

Example:
    >>> cfg = SweepConfig.model_validate({"models": [{"name": "tiny", "tiny": "llama"}],
    ...     "data": {"examples": "examples.jsonl"}, "grid": "main"})
    >>> [s.name for s in resolve_specs(cfg)][:4]
    ['p', 'f', 'fe', 'lt']
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import GraftError
from ..grafter import Grafter
from ..result import target_token_id, top_other_token
from ..spec import GraftSpec, format_validation_error
from .examples import TestExample
from .grids import LmHeadMode, grid_specs, paper_specs, with_lm_head
from .metric_registry import DEFAULT_KS, DEFAULT_METRICS, MetricInputs, get_metric, stored_metrics
from .metric_registry import resolve as resolve_metrics
from .metrics import MIN_GAP, score_logits
from ..util.inputs import loading_model, refuse_duplicate_keys
from .models import FINGERPRINT_VERSION, environment_versions, model_identity, resolve_device
from .results import (FORMAT_VERSION, ResultsError, ResultsWriter, check_output, load_manifest, manifest_path,
                      output_lock, results_path, write_manifest)


class SweepConfigError(GraftError, ValueError):
    """A sweep config is malformed or names files, grids or models that do not exist."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelPair(_Strict):
    """A recipient P and donor F. ``recipient``/``donor``: local paths or hub ids. ``tiny``: use
    :func:`nngraft.testing.tiny_pair` of that model type instead (tests, ``--tiny`` recipes).
    ``donors``: extra named donors (paths or hub ids) for spec rules with ``"donor": NAME``, e.g.
    ``{"hybrid": "runs/hybrid/hybrid-…", "relation": "runs/sft/relation"}``."""

    name: str = Field(min_length=1)
    recipient: str | None = None
    donor: str | None = None
    donors: dict[str, str] = Field(default_factory=dict)
    tiny: str | None = None
    tiny_layers: int = Field(default=2, ge=1, le=64)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"

    @field_validator("tiny")
    @classmethod
    def _known_tiny(cls, value: str | None) -> str | None:
        from ..testing import TINY_CONFIGS

        if value is not None and value not in TINY_CONFIGS:
            raise ValueError(f"no tiny model of type {value[:40]!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError(f"{value[:40]!r} is not a device; use auto, cpu, cuda, cuda:1, mps …") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelPair":
        if self.tiny is None and not (self.recipient and self.donor):
            raise ValueError("give both 'recipient' and 'donor' (paths or hub ids), or 'tiny': MODEL_TYPE")
        if self.tiny is not None and (self.recipient or self.donor):
            raise ValueError("'tiny' replaces 'recipient' and 'donor'; give one or the other")
        for key in self.donors:
            if key == "default" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
                raise ValueError(f"donor name {key!r}: use a name such as 'hybrid' (letters, digits, _ . -; "
                                 "'default' is the main donor)")
        return self


class TemplateConfig(_Strict):
    """A test template: a name in ``TEST_TEMPLATES`` or a ``{field}`` string, plus fixed values for
    fields the facts lack (e.g. ``{"relation": "stars"}``)."""

    template: str
    name: str | None = None
    values: dict[str, str] = Field(default_factory=dict)


class DataConfig(_Strict):
    """Where the test examples come from: ``examples`` (a JSONL of test examples), or facts
    (``facts``: a JSONL file; or ``dataset`` + ``n`` + ``seed``: a built-in dataset) rendered
    through ``templates``."""

    examples: str | None = None
    facts: str | None = None
    dataset: str | None = None
    n: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    templates: list[str | TemplateConfig] = Field(default_factory=list)
    answer_field: str = "second_actor"
    limit: int | None = Field(default=None, ge=1, description="use only the first N facts")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        given = [k for k in ("examples", "facts", "dataset") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'examples', 'facts' or 'dataset' "
                             f"(got {', '.join(given) or 'none'})")
        if self.dataset and self.n is None:
            raise ValueError("'dataset' needs 'n' (how many facts to generate)")
        if self.examples and self.templates:
            raise ValueError("'templates' applies to 'facts'/'dataset'; an examples file already has prompts")
        return self


def grafter_for(pair: Any, pair_cfg: ModelPair, config: "SweepConfig") -> Grafter:
    """The Grafter of one loaded model pair on the config's backend (``local``, ``ndif``,
    ``ndif-local``)."""
    donor = pair.graft_donor or pair.donor
    options: dict[str, Any] = dict(donors=pair.donors, batch_size=config.batch_size)
    if config.backend == "local":
        return Grafter(pair.recipient, donor, pair.tokenizer, **options)
    if config.backend == "ndif-local":
        return Grafter.remote(pair.recipient, donor, pair.tokenizer, execution="local", verbose=False, **options)
    return Grafter.remote(pair_cfg.recipient, donor, pair.tokenizer, verbose=False, **options)


class SweepConfig(_Strict):
    """One sweep (see the module docstring for the file format)."""

    name: str = "sweep"
    models: list[ModelPair] = Field(min_length=1)
    data: DataConfig
    grid: str | list[str] | None = None
    specs: list[str] = Field(default_factory=list)
    lm_head: list[LmHeadMode] = Field(default_factory=lambda: ["never"])
    batch_size: int = Field(default=32, ge=1)
    backend: Literal["local", "ndif", "ndif-local"] = Field(
        default="local", description="where the passes run: local (this process), ndif (P on NDIF by its Hub "
        "id; F travels as tensors), ndif-local (the NDIF request round trip, served in this process)")
    ks: list[int] = Field(default_factory=lambda: list(DEFAULT_KS))
    n_top: int = Field(default=10, ge=1)
    check_baselines: int = Field(default=8, ge=0)
    answer_logprob: bool = Field(default=False, description="also score the whole answer (teacher forcing)")
    metrics: list[str] = Field(default_factory=list, description="metrics stored besides the defaults: registered "
                               "names or module:function (nngraft.study.metric_registry)")
    output: str | None = None
    base_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="after")
    def _needs_specs(self) -> "SweepConfig":
        if not self.grid and not self.specs:
            raise ValueError("give a 'grid' (e.g. \"main\") and/or 'specs' (spec JSON files)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        if self.backend == "ndif" and any(m.tiny for m in self.models):
            raise ValueError("backend 'ndif' runs P on NDIF: give each recipient as the Hub id NDIF hosts, not "
                             "'tiny' (use backend 'ndif-local' to check the remote path on a tiny model)")
        return self

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        for name in value:
            metric = get_metric(name)
            if metric.fn is None:
                raise ValueError(f"metric {name!r} is not computed from logits ({metric.description})")
        return value

    def metric_names(self) -> list[str]:
        """The metrics every row stores: the defaults, then those the config adds."""
        return list(dict.fromkeys([*DEFAULT_METRICS, *(get_metric(m).name for m in self.metrics)]))

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def output_dir(self) -> Path:
        return self.path(self.output or f"runs/{self.name}")


refuse_duplicate_keys(SweepConfig, SweepConfigError)  # SweepConfig.model_validate_json as load_sweep_config


def load_sweep_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read and validate a sweep config file; relative paths resolve against its folder.
    ``overrides``: fields the command line sets instead of the file (e.g. ``backend="ndif-local"``)."""
    from ..util.inputs import loads_json, read_text

    path = Path(path)
    raw = loads_json(read_text(path, "sweep config", SweepConfigError), f"sweep config {path}", SweepConfigError)
    if not isinstance(raw, dict):
        raise SweepConfigError(f"sweep config {path} must be a JSON object")
    raw["base_dir"] = str(path.parent)
    raw.update(overrides)
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error(error, str(path)).replace("invalid graft spec", "invalid sweep config")
        raise SweepConfigError(message) from None


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

_F_SPEC = paper_specs()["f"]
_P_SPEC = paper_specs()["p"]


def spec_role(spec: GraftSpec) -> str:
    """``"p"`` (no rules: plain P), ``"f"`` (everything at every position: F) or ``"graft"``."""
    if not spec.rules:
        return "p"
    if spec.content_hash() == _F_SPEC.content_hash():
        return "f"
    return "graft"


def resolve_specs(config: SweepConfig) -> list[GraftSpec]:
    """The sweep's specs: the grid's, then the files', each under every ``lm_head`` mode
    (baselines are not varied), with the baselines ``p`` and ``f`` added first if missing."""
    grids = [config.grid] if isinstance(config.grid, str) else list(config.grid or [])
    base: list[GraftSpec] = [spec for name in grids for spec in grid_specs(name)]
    for item in config.specs:
        base.append(GraftSpec.load(config.path(item)))
    specs: list[GraftSpec] = []
    for spec in base:
        modes = ["never"] if spec_role(spec) != "graft" else config.lm_head
        specs += [with_lm_head(spec, mode) for mode in modes]
    roles = {spec_role(s) for s in specs}
    defaults = paper_specs()
    specs = [defaults[r] for r in ("p", "f") if r not in roles] + specs
    by_name: dict[str, GraftSpec] = {}
    unique: list[GraftSpec] = []
    for spec in specs:
        seen = by_name.get(spec.name)
        if seen is None:
            by_name[spec.name] = spec
            unique.append(spec)
        elif seen.content_hash() != spec.content_hash():
            raise SweepConfigError(f"two different specs are named {spec.name!r}; rename one "
                                   "(results are keyed by spec name)")
    return unique


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _example_from_row(row: Any, where: str) -> TestExample:
    """One line of an examples file as a :class:`TestExample`; :class:`DataError` naming the line
    and the field for anything else (a missing field, ``null``, a list, a number as the prompt …)."""
    from ..errors import DataError

    needs = "each line needs fact_id, template, prompt, spans, answer"
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a test example (a JSON {type(row).__name__}, not an object); {needs}")
    missing = [k for k in ("fact_id", "template", "prompt", "answer") if k not in row]
    if missing:
        raise DataError(f"{where}: not a test example (no {', '.join(missing)}); {needs}")
    for key in ("fact_id", "template"):
        value = row[key]
        if not (isinstance(value, str) and value) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise DataError(f"{where}: {key} should be a non-empty string, got {value!r}; {needs}")
    for key in ("prompt", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: {key} should be a non-empty string, got {row[key]!r}; {needs}")
    spans = row.get("spans") or {}
    if not isinstance(spans, dict) or not all(isinstance(v, str) and v for v in spans.values()):
        raise DataError(f"{where}: spans should be an object of span name → non-empty text (e.g. "
                        f"{{\"first_actor\": \"Ada Lovelace\"}}), got {spans!r}")
    return TestExample(fact_id=str(row["fact_id"]), template=str(row["template"]), prompt=row["prompt"],
                       spans=dict(spans), answer=row["answer"])


def load_examples_jsonl(path: str | Path) -> list[TestExample]:
    """Test examples from a JSONL file: one ``{"fact_id", "template", "prompt", "spans", "answer"}``
    object per line (what :meth:`TestExample.to_dict` writes)."""
    from ..errors import DataError

    from ..util.inputs import loads_json, read_text

    path = Path(path)
    examples = []
    for number, line in enumerate(read_text(path, "examples file", DataError).splitlines(), 1):
        if not line.strip():
            continue
        row = loads_json(line, f"{path}:{number}", DataError)
        examples.append(_example_from_row(row, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path} holds no test examples")
    keys = [e.key for e in examples]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"{path}: example {dup!r} (fact_id/template) occurs twice")
    return examples


def save_examples_jsonl(examples: Sequence[TestExample], path: str | Path) -> Path:
    """Write test examples as JSONL (atomically)."""
    from ..util.io import atomic_write_text

    return atomic_write_text(Path(path), "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n"
                                                 for e in examples))


def load_data(config: SweepConfig) -> tuple[list[TestExample], dict[str, Any]]:
    """The sweep's test examples and a description of where they came from (for the manifest)."""
    from ..errors import DataError

    data = config.data
    if data.examples:
        examples = load_examples_jsonl(config.path(data.examples))
        source: dict[str, Any] = {"examples": str(config.path(data.examples))}
        if data.limit:
            keep = list(dict.fromkeys(e.fact_id for e in examples))[: data.limit]
            examples = [e for e in examples if e.fact_id in set(keep)]
    else:
        from . import data as datasets

        if data.facts:
            facts = datasets.load_facts(config.path(data.facts))
            source = {"facts": str(config.path(data.facts))}
        else:
            facts = datasets.make_facts(data.dataset, data.n, data.seed)
            source = {"dataset": data.dataset, "n": data.n, "seed": data.seed}
        if data.limit:
            facts = facts[: data.limit]
        source["facts_hash"] = datasets.facts_hash(facts)
        templates = list(data.templates)
        if not templates:
            if data.dataset and data.dataset in datasets.DATASETS:
                templates = list(datasets.DATASETS[data.dataset].test_templates)
            else:
                raise DataError("give 'templates' (names such as \"sentence_3\" or {field} strings) "
                                "to turn the facts into test prompts")
        expanded: list[str | TemplateConfig] = []
        for t in templates:  # a template file (a path with no {field}) stands for its templates
            if isinstance(t, str) and "{" not in t and t not in datasets.TEST_TEMPLATES:
                from .templates import read_test_templates

                expanded += [TemplateConfig(template=text, name=name)
                             for name, text in read_test_templates(config.path(t))]
            else:
                expanded.append(t)
        examples = []
        for t in expanded:
            t = TemplateConfig(template=t) if isinstance(t, str) else t
            examples += datasets.make_test_examples(facts, t.template, data.answer_field, name=t.name,
                                                    values=t.values or None)
        source["templates"] = [t if isinstance(t, str) else t.model_dump() for t in templates]
        source["answer_field"] = data.answer_field
    return examples, source


def examples_hash(examples: Sequence[TestExample]) -> str:
    """sha256 of the examples' canonical JSON (keys, prompts, spans, answers)."""
    blob = json.dumps([e.to_dict() for e in examples], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




@dataclass
class LoadedPair:
    name: str
    recipient: torch.nn.Module
    donor: torch.nn.Module
    tokenizer: Any
    identity: dict[str, Any]
    donors: dict[str, torch.nn.Module] = field(default_factory=dict)
    graft_donor: Any = None
    """What to graft from when it is not ``donor`` itself (a LoRA adapter; ``donor`` is then P
    with the adapter merged, for the plain-F baseline check)."""


def load_pair(pair: ModelPair, config: SweepConfig | None = None) -> LoadedPair:
    """Load P, F and the tokenizer of a :class:`ModelPair` (on its device and dtype)."""
    device = resolve_device(pair.device)
    if pair.tiny:
        from ..testing import tiny_pair

        P, F, tok = tiny_pair(pair.tiny, n_layers=pair.tiny_layers)
        graft_from = None
        src_p = f"nngraft.testing.tiny_pair({pair.tiny!r}, n_layers={pair.tiny_layers}) P"
        src_f = f"nngraft.testing.tiny_pair({pair.tiny!r}, n_layers={pair.tiny_layers}) F"
        if pair.dtype in _DTYPES:
            P, F = P.to(_DTYPES[pair.dtype]), F.to(_DTYPES[pair.dtype])
    else:
        from ..donors.loading import load_model

        def resolve(value: str) -> str:
            local = config.path(value) if config is not None else Path(value)
            return str(local) if local.exists() else value

        src_p, src_f = resolve(pair.recipient), resolve(pair.donor)
        dtype = _DTYPES.get(pair.dtype, "auto")
        with loading_model(f"model {pair.name!r}: the recipient", src_p):
            P, tok = load_model(src_p, dtype=dtype)
        with loading_model(f"model {pair.name!r}: the donor", src_f):
            F, graft_from = load_donor(src_f, P, dtype=dtype)
    P, F = P.to(device).eval(), F.to(device).eval()
    identity = {"recipient": model_identity(P, src_p), "donor": model_identity(F, src_f),
                "device": str(device)}
    if graft_from is not None:
        identity["donor"]["lora_adapter"] = graft_from.describe()
    donors = {}
    for key, value in pair.donors.items():  # extra named donors: always paths or hub ids
        local = config.path(value) if config is not None else Path(value)
        src = str(local) if local.exists() else value
        with loading_model(f"model {pair.name!r}: donor {key!r}", src):
            donors[key], _ = load_donor(src, P, dtype=_DTYPES.get(pair.dtype, "auto"))
        donors[key] = donors[key].to(device).eval()
        identity.setdefault("donors", {})[key] = model_identity(donors[key], src)
    loaded = LoadedPair(pair.name, P, F, tok, identity, donors)
    loaded.graft_donor = graft_from
    return loaded


def load_donor(name: str, recipient: torch.nn.Module, *, dtype: Any) -> tuple[torch.nn.Module, Any]:
    """``(F as a whole model, LoraDonor or None)`` for a donor name (:mod:`nngraft.donors.loading`). A PEFT
    LoRA adapter folder is grafted as a :class:`~nngraft.donors.delta.LoraDonor`; the whole model returned
    beside it is P with the adapter merged (by PEFT when installed), used for the plain-F baseline
    check, so every run compares the adapter's grafts against merged weights."""
    from ..donors.loading import load_model, resolve_model

    source = resolve_model(name)
    if source.kind != "adapter":
        return load_model(name, dtype=dtype)[0], None
    from ..donors.delta import LoraDonor

    lora = LoraDonor(source.path)
    lora.check_against(recipient)
    return merged_lora_model(recipient, source.path), lora


def merged_lora_model(recipient: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """A copy of ``recipient`` with the LoRA adapter merged into its weights: with PEFT's
    ``merge_and_unload`` when PEFT is installed, else with :class:`~nngraft.donors.delta.LoraDonor`'s
    ``W + scale · B·A`` per adapted module."""
    import copy

    base = copy.deepcopy(recipient)
    try:
        from peft import PeftModel
    except ImportError:
        from ..arch import get_module
        from ..donors.delta import LoraDonor

        lora = LoraDonor(adapter)
        paths = set(lora.factors) | {n.rpartition(".")[0] for n in lora.full}
        with torch.no_grad():
            for path in paths:
                module = get_module(base, path)
                for name, value in lora.params(path, module).items():
                    owner, _, leaf = name.rpartition(".")
                    getattr(get_module(module, owner) if owner else module, leaf).copy_(value)
        return base.eval()
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalStats:
    """What one :func:`evaluate` call did."""

    units: int = 0
    skipped: int = 0
    written: int = 0
    batches: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def plan_batches(specs: Sequence[GraftSpec], lengths: Sequence[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """All (spec index, example index) units in fixed batches: sorted by prompt length (then
    example, then spec) and cut every ``batch_size`` units. Depends only on the inputs, never on
    which units are already done, so a resumed run batches exactly like an uninterrupted one."""
    units = sorted(((s, e) for s in range(len(specs)) for e in range(len(lengths))),
                   key=lambda u: (lengths[u[1]], u[1], u[0]))
    return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


def check_spans(specs: Sequence[GraftSpec], examples: Sequence[TestExample]) -> None:
    """Raise if a spec grafts at a span some example does not have (checked before any model is
    loaded, so a long sweep never fails half-way; nothing is silently dropped)."""
    for ex in examples:
        for spec in specs:
            missing = spec.rule_names_span() - set(ex.spans)
            if missing:
                users = [s.name for s in specs if s.rule_names_span() & missing]
                raise GraftError(f"example {ex.key!r} has no span {sorted(missing)} (its spans: "
                                 f"{sorted(ex.spans)}), which specs {users} graft at; use a template "
                                 "with those {fields} or leave those specs out")


def check_donors(specs: Sequence[GraftSpec], models: Sequence[ModelPair]) -> None:
    """Raise if a spec's rule names a donor (``"donor": NAME``) that some model pair does not
    give in its ``donors`` (checked before any model is loaded)."""
    for pair in models:
        for spec in specs:
            missing = sorted({r.donor for r in spec.rules if r.donor not in (None, "default")} - set(pair.donors))
            if missing:
                raise SweepConfigError(
                    f"spec {spec.name!r} grafts from donor(s) {missing}, but model {pair.name!r} has "
                    f"donors {sorted(pair.donors)}; add them to its \"donors\" (e.g. {{\"{missing[0]}\": PATH}}) "
                    "or leave the spec out")


def evaluate(grafter: Grafter, specs: Sequence[GraftSpec], examples: Sequence[TestExample], *,
             model: str = "model", writer: ResultsWriter | None = None, batch_size: int = 32,
             ks: Sequence[int] = DEFAULT_KS, n_top: int = 10, answer_logprob: bool = False,
             metrics: Sequence[Any] | None = None,
             progress: Callable[[int], None] | None = None) -> EvalStats:
    """Score every spec on every example with ``grafter``; append rows to ``writer`` (skipping
    units it already holds) or, without a writer, return them in ``EvalStats.rows``.

    Spans are located for every example before any forward pass, so a prompt whose span cannot
    be found fails the run up front (nothing is silently dropped). With ``answer_logprob``, rows
    also get the teacher-forced log-probability of the whole answer (:mod:`.answer`).

    ``metrics``: the registered metrics (names, ``module:function``, or callables
    ``fn(logits, inputs)``; :mod:`.metric_registry`) each row stores, besides ``top_k`` for each
    of ``ks``; default :data:`~.metric_registry.DEFAULT_METRICS`.

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> ex = TestExample("f1", "t", "Ada Lovelace stars in a movie alongside",
        ...                  {"first_actor": "Ada Lovelace"}, "Alan Turing")
        >>> stats = evaluate(Grafter(P, F, tok), [paper_specs()["p"], paper_specs()["fe"]], [ex])
        >>> [(r["spec"], r["example"]) for r in stats.rows]
        [('p', 'f1/t'), ('fe', 'f1/t')]
    """
    start = time.perf_counter()
    chosen = resolve_metrics(metrics) + [get_metric(f"top_{k}") for k in ks]
    tokenizer = grafter.tokenizer
    tokenized = grafter.tokenize([e.prompt for e in examples], [e.spans for e in examples])
    check_spans(specs, examples)
    targets = [target_token_id(tokenizer, e.prompt, e.answer) for e in examples]
    target_text = [tokenizer.decode([t]) for t in targets]
    target_piece = tokenizer.convert_ids_to_tokens(targets)
    if answer_logprob:
        from .answer import answer_logprobs, answer_token_ids

        answer_ids = [answer_token_ids(tokenizer, e.prompt, e.answer) for e in examples]
    hashes = [s.content_hash() for s in specs]
    roles = [spec_role(s) for s in specs]
    stats = EvalStats(units=len(specs) * len(examples))
    done = writer.done if writer is not None else {}
    baseline: dict[tuple[str, str], float] = {}  # (role, example key) -> prob of this run's p / f row
    for (m, name, key), row in done.items():
        role = next((r for s, r in zip(specs, roles) if s.name == name), None)
        if m == model and role in ("p", "f"):
            baseline[(role, key)] = row["prob"]
    lengths = [len(t) for t in tokenized]
    phases = [[i for i, r in enumerate(roles) if r in ("p", "f")], [i for i, r in enumerate(roles) if r not in ("p", "f")]]
    batches = [[(phase[s], e) for s, e in batch]  # P and F rows first: every other row's recovery needs them
               for phase in phases if phase
               for batch in plan_batches([specs[i] for i in phase], lengths, batch_size)]
    for batch in batches:
        todo = [u for u in batch if (model, specs[u[0]].name, examples[u[1]].key) not in done]
        stats.skipped += len(batch) - len(todo)
        if not todo:
            continue
        extra = baseline_rows(batch, roles)
        result = grafter.run_rows([specs[s] for s, _ in batch] + [_P_SPEC if r == "p" else _F_SPEC for r, _ in extra],
                                  [tokenized[e] for _, e in batch] + [tokenized[e] for _, e in extra],
                                  batch_size=len(batch) + len(extra))
        logits = result.logits[:len(batch)]
        scores = score_logits(logits, [targets[e] for _, e in batch], ks=(), n_top=n_top)
        inputs = baseline_inputs(logits, result.logits[len(batch):], batch, extra, roles, targets)
        values = {m.name: m.row_values(logits.detach().float().cpu(), inputs) for m in chosen}
        foil = top_other_token(inputs.p_logits, inputs.target_ids)
        if answer_logprob:
            per_token = answer_logprobs(grafter, [specs[s] for s, _ in batch], [tokenized[e] for _, e in batch],
                                        [answer_ids[e] for _, e in batch])
        rows = []
        for j, (s, e) in enumerate(batch):
            if (s, e) not in todo:
                continue
            ex = examples[e]
            row = {
                "model": model, "spec": specs[s].name, "spec_hash": hashes[s], "example": ex.key,
                "fact_id": ex.fact_id, "template": ex.template, "prompt": ex.prompt,
                "answer": ex.answer, "target_id": targets[e], "target_text": target_text[e],
                "target_token": target_piece[e],
                **{name: v[j] for name, v in values.items()},
                "foil_id": int(foil[j]), "foil_token": tokenizer.decode([int(foil[j])]),
            }
            row["top_tokens"] = [tokenizer.decode([int(t)]) for t in scores.top_ids[j]]
            row["top_probs"] = [round(float(p), 6) for p in scores.top_probs[j]]
            if answer_logprob:
                row["answer_logprob"] = sum(per_token[j])
                row["answer_tokens"] = len(per_token[j])
            rows.append(row)
        for (s, e), row in zip([u for u in batch if u in todo], rows):
            if roles[s] in ("p", "f"):
                baseline[(roles[s], examples[e].key)] = row["prob"]
        for (s, e), row in zip([u for u in batch if u in todo], rows):
            key = examples[e].key
            row.update(row_recovery(row["prob"], baseline.get(("p", key)), baseline.get(("f", key))))
        if writer is not None:
            writer.append(rows)
        else:
            stats.rows += rows
        stats.written += len(rows)
        stats.batches += 1
        if progress is not None:
            progress(len(rows))
    stats.seconds = time.perf_counter() - start
    return stats


def baseline_rows(batch: Sequence[tuple[int, int]], roles: Sequence[str]) -> list[tuple[str, int]]:
    """The (role, example) baseline rows a batch adds to its own forward pass: P ("p") and F
    ("f") for every example of the batch whose p / f unit is not in the batch itself. Depends only
    on the batch, never on which units are already done, so a resumed run computes every number
    exactly as an uninterrupted one."""
    present = {(roles[s], e) for s, e in batch if roles[s] in ("p", "f")}
    examples = dict.fromkeys(e for _, e in batch)
    return [(role, e) for role in ("p", "f") for e in examples if (role, e) not in present]


def baseline_inputs(logits: torch.Tensor, extra_logits: torch.Tensor, batch: Sequence[tuple[int, int]],
                    extra: Sequence[tuple[str, int]], roles: Sequence[str], targets: Sequence[int]) -> MetricInputs:
    """Per row of a batch, its target and P's and F's next-token logits on the same example (from
    the batch's own p / f units or its :func:`baseline_rows`): what a metric scores a row against."""
    logits = logits.detach().float().cpu()
    found = {(roles[s], e): logits[j] for j, (s, e) in enumerate(batch) if roles[s] in ("p", "f")}
    found.update({key: extra_logits[i].detach().float().cpu() for i, key in enumerate(extra)})
    rows = [e for _, e in batch]
    ids = torch.tensor([targets[e] for e in rows])
    p = torch.stack([found[("p", e)] for e in rows])
    f = torch.stack([found[("f", e)] for e in rows])
    return MetricInputs(ids, p, f)


def row_recovery(prob: float, p: float | None, f: float | None, *, min_gap: float = MIN_GAP) -> dict[str, Any]:
    """One row's recovery of target probability against the same example's P and F rows of the
    run: ``{"p_prob", "f_prob", "recovery"}`` with recovery = (G − P) / (F − P), ``None`` when
    |F − P| < ``min_gap`` (then it would only amplify noise) or a baseline is not in the run.

    Example:
        >>> row_recovery(0.5, 0.1, 0.9)
        {'p_prob': 0.1, 'f_prob': 0.9, 'recovery': 0.5}
        >>> row_recovery(0.5, 0.1, 0.12)["recovery"] is None
        True
    """
    if p is None or f is None:
        return {"p_prob": p, "f_prob": f, "recovery": None}
    value = (prob - p) / (f - p) if abs(f - p) >= min_gap else None
    return {"p_prob": p, "f_prob": f, "recovery": value}


def direct_probs(model: torch.nn.Module, tokenizer: Any, examples: Sequence[TestExample]) -> list[float]:
    """Target probability from a plain forward of ``model`` on each prompt alone (no nngraft
    graft path, no padding): the reference the ``p`` and ``f`` rows are checked against."""
    out = []
    device = next(model.parameters()).device
    for ex in examples:
        ids = tokenizer(ex.prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        target = target_token_id(tokenizer, ex.prompt, ex.answer)
        out.append(float(torch.softmax(logits, -1)[target]))
    return out


def check_baselines(pair: LoadedPair, specs: Sequence[GraftSpec], examples: Sequence[TestExample],
                    rows: dict[tuple[str, str, str], dict[str, Any]]) -> dict[str, Any]:
    """Compare the ``p`` / ``f`` rows with plain forwards of P / F (max |Δ prob|), and rows of a
    spec grafting everything from a named donor X at every position with plain forwards of X
    (reported as ``donor:X``)."""
    report: dict[str, Any] = {"n_examples": len(examples)}
    tolerance = 1e-4 if pair.identity["recipient"]["dtype"] == "float32" else 2e-2
    report["tolerance"] = tolerance
    ok = True
    checks = [("p", pair.recipient, lambda s: spec_role(s) == "p"), ("f", pair.donor, lambda s: spec_role(s) == "f")]
    for key, model in pair.donors.items():
        whole = GraftSpec(rules=[r.model_copy(update={"donor": key}) for r in _F_SPEC.rules]).content_hash()
        checks.append((f"donor:{key}", model, lambda s, whole=whole: s.content_hash() == whole))
    for role, model, matches in checks:
        names = [s.name for s in specs if matches(s)]
        if not names or not examples:
            continue
        ref = direct_probs(model, pair.tokenizer, examples)
        diffs = [abs(rows[(pair.name, names[0], ex.key)]["prob"] - r) for ex, r in zip(examples, ref)
                 if (pair.name, names[0], ex.key) in rows]
        gap = max(diffs) if diffs else None
        report[role] = {"spec": names[0], "max_abs_prob_diff": gap}
        ok = ok and gap is not None and gap <= tolerance
    report["ok"] = ok
    return report


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_resume(manifest: dict[str, Any], writer: ResultsWriter, specs: Sequence[GraftSpec],
                  examples: Sequence[TestExample], models: dict[str, dict[str, Any]],
                  answer_logprob: bool = False, metrics: Sequence[str] = ()) -> None:
    """Refuse to extend results that were made with other models, specs, prompts or metrics."""
    if manifest and manifest.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ResultsError(f"{writer.path} was written by a newer nngraft (format "
                           f"{manifest.get('format_version')}); upgrade to extend it")
    for name, identity in models.items():
        old = manifest.get("models", {}).get(name)
        if not old:
            continue
        records = [(side, old.get(side)) for side in ("recipient", "donor")]
        records += [(f"donor {d!r}", old.get("donors", {}).get(d)) for d in identity.get("donors", {})]
        for what, before in records:
            version = (before or {}).get("fingerprint_version")
            if before is not None and version != FINGERPRINT_VERSION:
                written = ("an older nngraft, whose weight fingerprint covered only the first 64 values of "
                           "each tensor" if version is None else f"fingerprint_version {version}")
                raise ResultsError(
                    f"{writer.path} holds results for model {name!r} recorded by {written}; this nngraft "
                    f"hashes every byte of the weights (fingerprint_version {FINGERPRINT_VERSION}), so it "
                    f"cannot confirm that this run's {what} is the model that made those rows. Use a new "
                    f"output directory; or, if you are sure the models are the same, delete "
                    f"\"models\" → {name!r} from {manifest_path(writer.path)} and rerun to record them anew")
        for side in ("recipient", "donor"):
            for key in ("config_hash", "weights_fingerprint", "dtype"):
                if old.get(side, {}).get(key) != identity[side][key]:
                    raise ResultsError(
                        f"{writer.path} holds results for model {name!r} whose {side} {key} was "
                        f"{old.get(side, {}).get(key)!r}; this run's is {identity[side][key]!r}. "
                        "Use a new output directory (or another model name)")
        for donor, ident in identity.get("donors", {}).items():  # named donors, e.g. "hybrid"
            before = old.get("donors", {}).get(donor)
            for key in ("config_hash", "weights_fingerprint", "dtype"):
                if before is not None and before.get(key) != ident[key]:
                    raise ResultsError(
                        f"{writer.path} holds results for model {name!r} whose donor {donor!r} {key} was "
                        f"{before.get(key)!r}; this run's is {ident[key]!r}. "
                        "Use a new output directory (or another model name)")
    if writer.existing and answer_logprob != ("answer_logprob" in writer.existing[0]):
        raise ResultsError(f"{writer.path} was written with answer_logprob="
                           f"{not answer_logprob}; this run asks for {answer_logprob}. Rows must agree: "
                           "use a new output directory")
    if writer.existing and "kl_f_graft" not in writer.existing[0]:
        raise ResultsError(f"{writer.path} was written by an older nngraft, without the logit_diff and KL "
                           "columns this version writes to every row. Rows must agree: use a new output "
                           "directory")
    if writer.existing and metrics:
        before = [m.name for m in stored_metrics(writer.existing[0])
                  if m.fn is not None and not m.name.startswith("top_")]
        if set(before) != set(metrics):
            raise ResultsError(f"{writer.path} was written with the metrics {', '.join(before)}; this run asks for "
                               f"{', '.join(metrics)}. Rows must agree: use a new output directory, or the same "
                               "--metric options as before")
    spec_hash = {s.name: s.content_hash() for s in specs}
    prompts = {e.key: (e.prompt, e.answer) for e in examples}
    for row in writer.existing:
        h = spec_hash.get(row.get("spec"))
        if h is not None and row.get("spec_hash") != h:
            raise ResultsError(f"{writer.path} holds rows for spec {row['spec']!r} with hash "
                               f"{row.get('spec_hash')}, but this run's spec {row['spec']!r} has hash {h}: "
                               "the spec changed. Rename it, or use a new output directory")
        known = prompts.get(row.get("example"))
        if known is not None and (row.get("prompt"), row.get("answer")) != known:
            raise ResultsError(f"{writer.path} holds example {row['example']!r} with prompt "
                               f"{row.get('prompt')!r} → {row.get('answer')!r}; this run's is {known[0]!r} → "
                               f"{known[1]!r}. The data changed; use a new output directory")


@dataclass
class SweepOutcome:
    """Where a sweep wrote, and what it did per model."""

    output: Path
    results: Path
    manifest: Path
    stats: dict[str, EvalStats]
    baseline_check: dict[str, Any]


def run_sweep(config: SweepConfig, *, output: str | Path | None = None, show_progress: bool = True,
              console: Any = None) -> SweepOutcome:
    """Run a sweep, appending to ``output/results.jsonl`` (resuming if it exists) and keeping
    ``output/manifest.json`` current. See the module docstring."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    console = console or Console(stderr=True)
    out_dir = Path(output) if output is not None else config.output_dir()
    specs = resolve_specs(config)
    examples, source = load_data(config)
    check_spans(specs, examples)
    check_donors(specs, config.models)
    results = check_output(results_path(out_dir))
    with output_lock(results.parent):
        writer = ResultsWriter(results)
        manifest = load_manifest(results)
        run_record = {"started": _now(), "rows_before": len(writer.existing)}
        recorded = False  # whether this run has written the manifest; a run refused before that leaves it as it was
        try:
            manifest.setdefault("format", "nngraft.results")
            manifest["format_version"] = FORMAT_VERSION
            manifest.setdefault("created", _now())
            manifest["versions"] = environment_versions()
            manifest["sweep"] = config.model_dump(mode="json")
            manifest.setdefault("specs", {})
            for s in specs:
                manifest["specs"][s.name] = {"hash": s.content_hash(), "role": spec_role(s),
                                             "spec": json.loads(s.to_json())}
            manifest["dataset"] = {**source, "hash": examples_hash(examples), "n_examples": len(examples),
                                   "n_facts": len({e.fact_id for e in examples}),
                                   "templates": sorted({e.template for e in examples})}
            manifest["ks"] = list(config.ks)
            manifest["seeds"] = {"data": config.data.seed if not config.data.examples else None,
                                 "bootstrap": 0, "tiny_models": 0 if any(m.tiny for m in config.models) else None}
            manifest["dtypes"] = {m.name: m.dtype for m in config.models}
            manifest["metrics"] = ("prob/logprob: softmax of the last-token logits in float32; rank: "
                                   "number of tokens with strictly higher log-prob (0-based); top_k: rank < k; "
                                   "logit_diff: target logit minus P's most likely other token's; "
                                   "kl_f_graft / kl_graft_p: KL(F||G) / KL(G||P) in nats over the next token")
            manifest.setdefault("models", {})
            manifest.setdefault("baseline_check", {})
            manifest.setdefault("runs", [])
            stats: dict[str, EvalStats] = {}

            class Rate(ProgressColumn):
                def render(self, task: Any) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:,.0f} ex/s" if speed else "– ex/s", style="cyan")

            for pair_cfg in config.models:
                console.print(f"[bold]{pair_cfg.name}[/bold]: loading models …")
                pair = load_pair(pair_cfg, config)
                _check_resume(manifest, writer, specs, examples, {pair.name: pair.identity}, config.answer_logprob,
                              config.metric_names())
                manifest["models"][pair.name] = pair.identity
                write_manifest(results, manifest)
                recorded = True
                grafter = grafter_for(pair, pair_cfg, config)
                total = len(specs) * len(examples)
                label = f"{pair.name}: {len(specs)} specs × {len(examples)} examples"
                with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                              TimeElapsedColumn(), TimeRemainingColumn(),
                              console=console, disable=not show_progress, transient=False) as bar:
                    already = sum(1 for k in writer.done if k[0] == pair.name)
                    if already:
                        bar.console.print(f"resuming: {already} of {total} rows already in {results}")
                    task = bar.add_task(label, total=total, completed=min(already, total))
                    stats[pair.name] = evaluate(
                        grafter, specs, examples, model=pair.name, writer=writer,
                        batch_size=config.batch_size, ks=config.ks, n_top=config.n_top,
                        answer_logprob=config.answer_logprob, metrics=config.metric_names(),
                        progress=lambda n: bar.advance(task, n))
                if config.check_baselines:
                    report = check_baselines(pair, specs, examples[: config.check_baselines], writer.done)
                    manifest["baseline_check"][pair.name] = report
                    if not report["ok"]:
                        console.print(f"[red]baseline check failed for {pair.name}[/red]: {report}")
                del grafter, pair
            run_record.update(finished=_now(), rows_written=sum(s.written for s in stats.values()),
                              rows_skipped=sum(s.skipped for s in stats.values()))
            return SweepOutcome(out_dir, results, manifest_path(results), stats, manifest["baseline_check"])
        finally:
            writer.close()
            if "finished" not in run_record:
                run_record.update(interrupted=_now(), rows_written=writer.written)
            if recorded:
                manifest.setdefault("runs", []).append(run_record)
                write_manifest(results, manifest)
