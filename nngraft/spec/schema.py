"""Graft specs: *what* to graft, as plain, shareable, versioned data.

A :class:`GraftSpec` is a list of :class:`GraftRule`. Each rule is a product

    components × layers × positions

"graft F's ``q`` and ``k`` projections, in the last quarter of the layers, at the tokens of the
``first_actor`` span and at the last token". A spec never names module paths: the same JSON runs
on GPT-2, Pythia, Llama or Gemma, because :mod:`nngraft.arch` maps component names to modules.

Specs are data. Loading one never imports or evaluates anything it names; unknown fields are
rejected, and every validation error says which rule and which field is wrong.

Example:
    >>> spec = GraftSpec(name="fe_lt", rules=[GraftRule(
    ...     components=["all"], positions=[Span(span="first_actor"), Last()])])
    >>> GraftSpec.model_validate_json(spec.model_dump_json()) == spec
    True

:data:`SCHEMA_VERSION` is the newest spec format this nngraft reads; a spec is written with the
oldest version that holds it:
    >>> from nngraft import SCHEMA_VERSION
    >>> SCHEMA_VERSION, spec.schema_version, GraftSpec(layer_groups="paper").schema_version
    ('2', '1', '2')
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import ArgumentError, SpecError
from ..util.io import refuse_duplicate_keys
# the components, layers and positions of a spec live in their own modules; their names stay
# importable from here, where they were defined before 0.2
from .components import (COMPONENT_GROUPS, COMPONENTS, GLOBAL_COMPONENTS, LAYER_COMPONENTS,  # noqa: F401
                         ComponentName)
from .layers import (LayerGroups, LayerRange, LayerSelection, check_layer_string, paper_layer_group,  # noqa: F401
                     resolve_layers)
from .positions import POSITION_KINDS, All, Index, Last, Not, Other, PositionSelector, Span, Strict  # noqa: F401

SCHEMA_VERSION = "2"
"""The newest spec format this nngraft reads and writes. Older versions stay readable. Version 2
adds ``layer_groups``; a spec that does not use it is written as version 1, so older nngraft
versions keep reading it."""

# ---------------------------------------------------------------------------------------------
# Rules and specs
# ---------------------------------------------------------------------------------------------


class WeightSelection(Strict):
    """Graft only part of each component's weight change ΔW = W_F − W_P (parameter-level grafts).

    Exactly one of:

    - ``top_percent``: the largest ``top_percent`` % of ``|ΔW|`` entries, ranked within each
      tensor (``per: "tensor"``) or across all the rule's tensors of a layer (``per: "layer"``);
    - ``rank``: the rank-``r`` SVD truncation of each weight matrix's ΔW (1-D parameters —
      biases, norm weights — keep their whole ΔW);
    - ``rows`` / ``columns``: output features / input features, in ``nn.Linear`` orientation
      (``weight[rows, :]`` and ``bias[rows]`` / ``weight[:, columns]``); for embeddings rows are
      token ids;
    - ``heads``: attention heads (rows of q/k/v, columns of o; k/v heads are the KV heads);
    - ``neurons``: MLP neurons (rows of gate/up, columns of down).

    The grafted module computes ``W_P + ΔW_partial`` — for a linear layer, P's output plus
    ``x · ΔW_partialᵀ``.

    In a spec: ``{"rank": 4}``, ``{"top_percent": 5, "per": "layer"}``, ``{"neurons": [7, 12]}``.

    Example:
        >>> from nngraft import GraftRule, Last, WeightSelection
        >>> rule = GraftRule(components=["mlp"], positions=[Last()], weights={"top_percent": 5, "per": "layer"})
        >>> rule.weights == WeightSelection(top_percent=5, per="layer"), rule.weights.kind
        (True, 'top_percent')
    """

    top_percent: float | None = Field(default=None, gt=0, le=100)
    per: Literal["tensor", "layer"] = "tensor"
    rank: int | None = Field(default=None, ge=1)
    rows: list[int] | None = Field(default=None, min_length=1)
    columns: list[int] | None = Field(default=None, min_length=1)
    heads: list[int] | None = Field(default=None, min_length=1)
    neurons: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "WeightSelection":
        chosen = [k for k in ("top_percent", "rank", "rows", "columns", "heads", "neurons")
                  if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of top_percent, rank, rows, columns, heads, neurons "
                             f"(got {', '.join(chosen) or 'none'})")
        if self.per == "layer" and chosen != ["top_percent"]:
            raise ValueError("per: 'layer' only applies to top_percent")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("top_percent", "rank", "rows", "columns", "heads", "neurons")
                    if getattr(self, k) is not None)

    def key(self) -> str:
        """A short stable name for this selection (used to name the derived donor)."""
        blob = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)
        return f"{self.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


class GraftRule(Strict):
    """Graft ``components`` at ``layers`` for the tokens ``positions`` select.

    Example:
        >>> GraftRule(components=["gate", "up", "down"], layers="fourth_quarter",
        ...           positions=[Last()]).layers
        'fourth_quarter'
    """

    components: list[ComponentName] = Field(
        min_length=1,
        description="Component names or groups: " + ", ".join(COMPONENTS) + "; groups "
        + ", ".join(f"{g} ({'+'.join(m)})" for g, m in COMPONENT_GROUPS.items() if g != "all")
        + ", all (every block component).",
    )
    layers: LayerSelection = Field(
        default="all",
        description="Which blocks: 'all', 'first_quarter'…'fourth_quarter', 'first_eighth'…"
        "'eighth_eighth', 'first_half'/'second_half', 'first:K', 'last:K', a list of indices "
        "(negative allowed) or {'start': A, 'stop': B}. Not applied to global components.",
    )
    positions: list[PositionSelector] = Field(min_length=1)
    donor: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description="Which donor grafts this rule, by name, when the run has several "
        "(Grafter(P, F, tok, donors={'hybrid': H})); default: the main donor F.",
    )
    weights: WeightSelection | None = Field(
        default=None,
        description="Graft only part of the weight change ΔW = W_F − W_P: top_percent, rank, rows, "
        "columns, heads or neurons (see WeightSelection). Default: all of it.",
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: LayerSelection) -> LayerSelection:
        if isinstance(value, str):
            return check_layer_string(value)
        if isinstance(value, list) and not value:
            raise ValueError("an empty layer list selects nothing; leave the rule out instead")
        return value

    @model_validator(mode="after")
    def _everything_needs_all_layers(self) -> "GraftRule":
        if "everything" in self.components and self.layers != "all":
            raise ValueError(
                "'everything' includes the embeddings and the LM head, which are not in a layer; "
                "use 'all' to graft every block component of a layer subset"
            )
        return self


class ModelRef(Strict):
    """Which model a spec was written for (informational; not enforced)."""

    name: str
    revision: str | None = None


class GraftSpec(Strict):
    """A named, versioned set of graft rules. This is the file researchers share.

    Several rules combine as a union: a (component, layer, position) named by two rules is
    grafted once (grafting is idempotent, so this is not an error). Naming it from two
    *different* donors (``rule.donor``) is an error: it would be ambiguous.

    Example:
        >>> spec = GraftSpec.model_validate_json('''{"schema_version": "1", "name": "lt_mlp",
        ...   "rules": [{"components": ["mlp"], "layers": "last:4", "positions": [{"last": true}]}]}''')
        >>> spec.rules[0].layers
        'last:4'
    """

    schema_version: str = Field(default="1", description="Spec format version (2 when layer_groups is used).")
    name: str = Field(default="unnamed", description="Short identifier, e.g. 'fe_lt'.")
    description: str | None = None
    recipient: ModelRef | None = None
    donor: ModelRef | None = None
    layer_groups: LayerGroups = Field(
        default="even", description="How named layer groups split the layers: 'even' (nngraft's) or 'paper' "
        "(the paper's code: q = n // 4, the fourth quarter takes the remainder). Version 2.")
    rules: list[GraftRule] = Field(default_factory=list, description="Empty = no graft (plain P).")

    @model_validator(mode="before")
    @classmethod
    def _version_of_features(cls, data: Any) -> Any:
        """A spec that uses ``layer_groups`` other than ``even`` is (at least) version 2."""
        if isinstance(data, dict) and data.get("layer_groups", "even") != "even":
            version = str(data.get("schema_version", "1"))
            if version.isdigit() and int(version) < 2:
                data = {**data, "schema_version": "2"}
        return data

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if not value.isdigit():
            raise ValueError(f"schema_version must be a number as a string, e.g. {SCHEMA_VERSION!r}")
        if int(value) > int(SCHEMA_VERSION):
            raise ValueError(
                f"this spec uses schema_version {value}, written by a newer nngraft; this "
                f"nngraft reads versions up to {SCHEMA_VERSION}. Upgrade nngraft to load it."
            )
        return value

    # -- convenience ---------------------------------------------------------------------------

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>") -> "GraftSpec":
        """Parse and validate a JSON spec; raise :class:`SpecError` naming ``source`` and each bad field."""
        from ..util.io import check_no_duplicate_keys, decode_utf8

        if isinstance(text, bytes):
            text = decode_utf8(text, f"graft spec {source}", SpecError)
        check_no_duplicate_keys(text, f"invalid graft spec {source}", SpecError)
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise SpecError(format_validation_error(error, source)) from None

    @classmethod
    def load(cls, path: str | Path) -> "GraftSpec":
        """Read a spec file. ``GraftSpec.load("specs/fe_lt.json")``."""
        from ..util.io import read_text

        path = Path(path)
        return cls.from_json(read_text(path, "spec file", SpecError), source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the spec as pretty JSON (atomically: a temp file, then rename)."""
        from ..util.io import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")

    def to_json(self) -> str:
        if self.layer_groups == "even":  # not a version-2 feature: files stay readable by older nngraft
            return self.model_dump_json(indent=2, by_alias=True, exclude_none=True, exclude={"layer_groups"})
        return self.model_dump_json(indent=2, by_alias=True, exclude_none=True)

    def content_hash(self) -> str:
        """A short hash of the rules (not the name or description): equal hashes graft the same."""
        rules: Any = [r.model_dump(mode="json", by_alias=True) for r in self.rules]
        if self.layer_groups != "even":  # the same rules split other layers
            rules = {"layer_groups": self.layer_groups, "rules": rules}
        blob = json.dumps(rules, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _repr_html_(self) -> str:
        """In Jupyter: the spec's rules as a table (components, layers, positions, donor, weights)."""
        from ..util.html import html_table

        rows = [["+".join(r.components), json.dumps(r.layers) if not isinstance(r.layers, str) else r.layers,
                 ", ".join(json.dumps(p.model_dump(by_alias=True, exclude_none=True)) for p in r.positions),
                 r.donor or "F", r.weights.kind if r.weights is not None else "all of ΔW"] for r in self.rules]
        caption = f"GraftSpec {self.name!r}" + (f": {self.description}" if self.description else "") + \
            ("" if self.rules else " (no rules: plain P)")
        return html_table(["components", "layers", "positions", "donor", "weights"], rows, caption=caption)

    def rule_names_span(self) -> set[str]:
        """Names of every span the spec refers to (each prompt must provide them)."""
        names: set[str] = set()

        def visit(selector: Any) -> None:
            if isinstance(selector, Span):
                names.add(selector.span)
            elif isinstance(selector, Not):
                for inner in selector.not_:
                    visit(inner)

        for rule in self.rules:
            for selector in rule.positions:
                visit(selector)
        return names


refuse_duplicate_keys(GraftSpec, SpecError)  # pydantic's own JSON entry points refuse them as GraftSpec.load does


def format_validation_error(error: ValidationError, source: str = "<spec>") -> str:
    """Render a pydantic error as 'SOURCE: rules[1].layers: message' lines."""
    lines = [f"invalid graft spec {source}:"]
    for item in error.errors():
        loc = ""
        for part in item["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif part in POSITION_KINDS and loc.endswith("]") and ".positions" in loc:
                continue  # the union tag adds noise: rules[0].positions[1].span.span
            else:
                loc += ("." if loc else "") + str(part)
        if item["type"] == "json_invalid":
            loc = "(JSON)"
        lines.append(f"  {loc or '(top level)'}: {item['msg']}")
    return "\n".join(lines)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`GraftSpec` (published as ``docs/graft-spec.schema.json``).

    Example:
        >>> from nngraft import spec_json_schema
        >>> schema = spec_json_schema()
        >>> schema["$id"]
        'https://nngraft.dev/schema/graft-spec-v2.json'
        >>> sorted(schema["properties"])
        ['description', 'donor', 'layer_groups', 'name', 'recipient', 'rules', 'schema_version']
    """
    schema = GraftSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://nngraft.dev/schema/graft-spec-v{SCHEMA_VERSION}.json"
    return schema


SpecLike = Union["GraftSpec", str, Path, Mapping[str, Any]]
"""What the API accepts as a spec: a :class:`GraftSpec`, a JSON file path, or a dict."""


def as_spec(spec: SpecLike) -> GraftSpec:
    """A GraftSpec from a spec, a JSON file path, or a dict (validated, with readable errors).

    Example:
        >>> as_spec({"name": "lt", "rules": [{"components": ["mlp"], "positions": [{"last": True}]}]}).name
        'lt'
    """
    if isinstance(spec, GraftSpec):
        return spec
    if isinstance(spec, Mapping):
        try:
            return GraftSpec.model_validate(spec)
        except ValidationError as error:
            raise SpecError(format_validation_error(error, "<dict>")) from None
    if not isinstance(spec, (str, Path)):
        raise ArgumentError(f"spec: Input should be a GraftSpec, a spec file path or a dict, got {spec!r} "
                            f"({type(spec).__name__})")
    return GraftSpec.load(spec)


def is_spec_argument(value: Any) -> bool:
    """Whether ``value`` can only be a spec argument, never prompts: a GraftSpec, a spec dict
    (with ``"rules"``), or a non-empty list or name → spec dict of them."""
    def one(v: Any) -> bool:
        return isinstance(v, GraftSpec) or (isinstance(v, Mapping) and "rules" in v)

    if one(value):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(one(v) for v in value.values())
    return isinstance(value, (list, tuple)) and bool(value) and all(one(v) for v in value)


def spec_first(method: str, spec: Any, prompts: Any, *, old_order: bool = False) -> tuple[Any, Any]:
    """``(spec, prompts)`` as ``Grafter.<method>(spec, prompts, spans)`` takes them: every method
    takes the spec first. A spec where the prompts belong is the two swapped: for a method whose
    old order was prompts first (``old_order``: ``trace``, for one release), a
    :class:`DeprecationWarning` and the two put in order; otherwise an
    :class:`~nngraft.errors.ArgumentError` saying so."""
    if not is_spec_argument(prompts) or is_spec_argument(spec):
        return spec, prompts
    if old_order:
        from .. import deprecated

        deprecated.warn_argument_order(f"Grafter.{method}", stacklevel=4)
        return prompts, spec
    raise ArgumentError(f"Grafter.{method}: the spec and the prompts are swapped (a spec was given where the "
                        f"prompts belong); every Grafter method takes the spec first: "
                        f"g.{method}(spec, prompts, spans)")


def per_row(spec: SpecLike | Sequence[SpecLike], n: int) -> list[GraftSpec]:
    """One spec for each of ``n`` rows: one spec for all, or a sequence of exactly ``n``."""
    if isinstance(spec, (GraftSpec, str, Path, Mapping)):
        return [as_spec(spec)] * n
    if not isinstance(spec, Sequence):
        raise ArgumentError(f"spec: Input should be a GraftSpec, a spec file path, a dict, or a list of them, got "
                            f"{spec!r} ({type(spec).__name__})")
    specs = [as_spec(s) for s in spec]
    if len(specs) != n:
        raise ArgumentError(f"spec: got {len(specs)} specs for {n} prompts; give one spec, or one per prompt")
    return specs


# Short names for the common cases.
def everywhere_except(*selectors: Any) -> Not:
    """``Not(not_=[...])`` with a readable name: ``everywhere_except(Span(span="first_actor"))``.

    Example:
        >>> from nngraft import GraftRule, Span, everywhere_except
        >>> rule = GraftRule(components=["mlp"], positions=[everywhere_except(Span(span="first_actor"))])
        >>> rule.positions, rule.model_dump(by_alias=True)["positions"]
        ([Not(not_=[Span(span='first_actor')])], [{'not': [{'span': 'first_actor'}]}])
    """
    return Not(**{"not": list(selectors)})
