"""Sweep configs: the JSON file ``nngraft sweep`` reads (model pairs, data, templates, grids,
specs; see :mod:`nngraft.study.sweep`), validated with pydantic; the specs it resolves to (the
baselines ``p`` and ``f`` always first) and the test examples its data section gives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import GraftError
from ..spec import GraftSpec, format_validation_error
from .examples import TestExample, load_examples_jsonl
from .grids import LmHeadMode, grid_specs, paper_specs, with_lm_head
from .metric_registry import DEFAULT_KS, DEFAULT_METRICS, get_metric
from ..util.io import refuse_duplicate_keys


class SweepConfigError(GraftError, ValueError):
    """A sweep config is malformed or names files, grids or models that do not exist."""


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


class SpanRolesConfig(_Strict):
    """Which template field each of the paper's named spans is, for the built-in grids and specs:
    ``entity`` (FE, default ``first_actor``), ``title`` (M, ``movie_title``), ``relation`` (R,
    ``relation``). E.g. ``{"entity": "drug"}`` for drug → maker facts."""

    entity: str | None = None
    title: str | None = None
    relation: str | None = None

    @model_validator(mode="after")
    def _names(self) -> "SpanRolesConfig":
        from .grids import span_roles

        try:
            span_roles(self.entity, self.title, self.relation)
        except GraftError as error:
            raise ValueError(str(error)) from None
        return self

    def roles(self) -> dict[str, str | None]:
        return {"entity": self.entity, "title": self.title, "relation": self.relation}


class SweepConfig(_Strict):
    """One sweep (see the module docstring for the file format)."""

    name: str = "sweep"
    models: list[ModelPair] = Field(min_length=1)
    data: DataConfig
    spans: SpanRolesConfig = Field(default_factory=SpanRolesConfig)
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
                               "names (nngraft.study.metric_registry); module:function only on the command line")
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
    def _known_metrics(cls, value: list[str], info: ValidationInfo) -> list[str]:
        own_code = bool(info.context and info.context.get("own_code"))
        for name in value:
            if ":" in name and not own_code:
                # A config is data that may come from someone else: importing the module it names
                # would run that module's code. Your own function goes on your command line
                # (--metric module:function) or in Python, where you chose it.
                raise ValueError(f"metric {name!r}: a sweep config names registered metrics only, not "
                                 "module:function (a shared config must not import code); give your own "
                                 "function with --metric module:function, or register it in Python")
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
    from ..util.io import loads_json, read_text

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


F_SPEC = paper_specs()["f"]
"""The baseline ``f``: everything grafted at every position (= running F)."""
P_SPEC = paper_specs()["p"]
"""The baseline ``p``: no graft (= running P)."""


def spec_role(spec: GraftSpec) -> str:
    """``"p"`` (no rules: plain P), ``"f"`` (everything at every position: F) or ``"graft"``."""
    if not spec.rules:
        return "p"
    if spec.content_hash() == F_SPEC.content_hash():
        return "f"
    return "graft"


def resolve_specs(config: SweepConfig) -> list[GraftSpec]:
    """The sweep's specs: the grid's, then the files', each under every ``lm_head`` mode
    (baselines are not varied), with the baselines ``p`` and ``f`` added first if missing."""
    grids = [config.grid] if isinstance(config.grid, str) else list(config.grid or [])
    base: list[GraftSpec] = [spec for name in grids for spec in grid_specs(name, **config.spans.roles())]
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


def load_data(config: SweepConfig) -> tuple[list[TestExample], dict[str, Any]]:
    """The sweep's test examples and a description of where they came from (for the manifest)."""
    from .errors import DataError

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
                from .template_files import read_test_templates

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
