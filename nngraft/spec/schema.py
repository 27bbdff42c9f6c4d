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
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import LayerRangeError, SchemaVersionError, SpecError
from ..util.inputs import refuse_duplicate_keys

SCHEMA_VERSION = "2"
"""The newest spec format this nngraft reads and writes. Older versions stay readable. Version 2
adds ``layer_groups``; a spec that does not use it is written as version 1, so older nngraft
versions keep reading it."""

LayerGroups = Literal["even", "paper"]
"""How named layer groups split the layers: ``even`` (nngraft's, part i of k is
``[⌊i·n/k⌋, ⌊(i+1)·n/k⌋)``) or ``paper`` (the paper's code: q = ⌊n/4⌋, the fourth quarter takes
the remainder, and its eighths as that code computed them)."""

# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

LAYER_COMPONENTS: tuple[str, ...] = (
    "ln_attn", "q", "k", "v", "q_norm", "k_norm", "o", "ln_mlp", "gate", "up", "down",
)
"""Components that live inside every transformer block (one per layer)."""

GLOBAL_COMPONENTS: tuple[str, ...] = ("embed", "pos_embed", "ln_final", "lm_head")
"""Components outside the blocks. A rule's ``layers`` does not apply to them."""

COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "q_norm", "k_norm", "o"),
    "mlp": ("gate", "up", "down"),
    "mlp_in": ("gate", "up"),
    "all": LAYER_COMPONENTS,
    "everything": LAYER_COMPONENTS + GLOBAL_COMPONENTS,
}
"""Names that stand for several components. A group expands to the members the architecture
has (``mlp`` on GPT-2 is ``up`` + ``down``); naming a single component it lacks is an error."""

COMPONENTS: tuple[str, ...] = GLOBAL_COMPONENTS + LAYER_COMPONENTS
ComponentName = Literal[
    "embed", "pos_embed", "ln_final", "lm_head",
    "ln_attn", "q", "k", "v", "q_norm", "k_norm", "o", "ln_mlp", "gate", "up", "down",
    "attn", "mlp", "mlp_in", "all", "everything",
]

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

_FRACTIONS = {"half": 2, "quarter": 4, "eighth": 8}
_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
_GROUP_RE = re.compile(r"^(first|second|third|fourth|fifth|sixth|seventh|eighth)_(half|quarter|eighth)$")
_FIRST_LAST_RE = re.compile(r"^(first|last):(\d+)$")


class LayerRange(BaseModel):
    """Layers ``start ≤ i < stop`` (Python slice semantics, negatives count from the end).

    Example: ``{"start": 4, "stop": -2}`` on a 12-layer model is layers 4 … 9.
    """

    model_config = ConfigDict(extra="forbid")
    start: int = 0
    stop: int | None = None


LayerSelection = Union[str, list[int], LayerRange]
"""``"all"``, a named group (``first_quarter`` … ``fourth_quarter``, ``first_eighth`` …
``eighth_eighth``, ``first_half``/``second_half``), ``"first:k"``/``"last:k"``, an explicit list
of indices (negative allowed), or a :class:`LayerRange`."""


def _check_layer_string(value: str) -> str:
    if value == "all" or _FIRST_LAST_RE.match(value):
        return value
    match = _GROUP_RE.match(value)
    if match and _ORDINALS.index(match[1]) < _FRACTIONS[match[2]]:
        return value
    raise ValueError(
        f"unknown layer group {value!r}; use 'all', 'first:K', 'last:K', a quarter such as "
        "'fourth_quarter', an eighth such as 'eighth_eighth', 'first_half'/'second_half', "
        "a list of indices, or {'start': A, 'stop': B}"
    )


def paper_layer_group(group: str, n_layers: int) -> list[int]:
    """A named layer group as the paper's code computed it (``get_layers_dict`` in its
    ``run_experiment.py``): q = ⌊n/4⌋; quarters ``[0, q)``, ``[q, 2q)``, ``[2q, 3q)``, ``[3q, n)``
    (the fourth takes the remainder); halves as two quarters each (``[0, 2q)``, ``[2q, n)``); its
    eighths with its formulas as written (the third is ``[2q, ⌊3q/2⌋)``, empty; the seventh and
    eighth were not exposed and are an error here).

    Example:
        >>> paper_layer_group("second_quarter", 30), paper_layer_group("fourth_quarter", 30)[0]
        ([7, 8, 9, 10, 11, 12, 13], 21)
        >>> paper_layer_group("third_eighth", 30)
        []
    """
    q = n_layers // 4
    table = {
        "first_quarter": (0, q), "second_quarter": (q, 2 * q), "third_quarter": (2 * q, 3 * q),
        "fourth_quarter": (3 * q, n_layers), "first_half": (0, 2 * q), "second_half": (2 * q, n_layers),
        "first_eighth": (0, q // 2), "second_eighth": (q // 2, q), "third_eighth": (2 * q, 3 * q // 2),
        "fourth_eighth": (3 * q // 2, 2 * q), "fifth_eighth": (2 * q, 5 * q // 2),
        "sixth_eighth": (5 * q // 2, 3 * q),
    }
    if group not in table:
        raise LayerRangeError(f"layer group {group!r} does not exist with layer_groups 'paper' (the paper's code "
                              "exposed no seventh or eighth eighth); use layer_groups 'even'")
    start, stop = table[group]
    return list(range(start, stop))


def resolve_layers(selection: LayerSelection, n_layers: int, groups: LayerGroups = "even") -> list[int]:
    """Turn a layer selection into sorted layer indices for a model with ``n_layers`` blocks.

    Named fractions split the layers as evenly as possible, earlier parts never larger than later
    ones: part ``i`` of ``k`` is ``[floor(i·n/k), floor((i+1)·n/k))``. So quarters nest exactly
    in eighths and every layer is in exactly one part. (The paper's code instead put the whole
    remainder in the fourth quarter and had broken eighths; for depths divisible by 4 the
    quarters agree.) ``groups="paper"`` splits named groups the paper's way instead
    (:func:`paper_layer_group`).

    Example:
        >>> resolve_layers("fourth_quarter", 30)
        [22, 23, 24, 25, 26, 27, 28, 29]
        >>> resolve_layers("fourth_quarter", 30, "paper")
        [21, 22, 23, 24, 25, 26, 27, 28, 29]
        >>> resolve_layers([0, -1], 12)
        [0, 11]
    """
    if isinstance(selection, LayerRange):
        layers = list(range(n_layers))[selection.start : selection.stop]
        what = f"range start={selection.start} stop={selection.stop}"
    elif isinstance(selection, list):
        layers = []
        for index in selection:
            if not -n_layers <= index < n_layers:
                raise LayerRangeError(
                    f"layer {index} is out of range for a model with {n_layers} layers "
                    f"(valid: 0 … {n_layers - 1}, or -{n_layers} … -1)"
                )
            layers.append(index % n_layers)
        what = f"list {selection}"
    elif selection == "all":
        layers, what = list(range(n_layers)), "'all'"
    elif match := _FIRST_LAST_RE.match(selection):
        k = int(match[2])
        if k == 0 or k > n_layers:
            raise LayerRangeError(
                f"layer group {selection!r} needs 1 … {n_layers} layers; the model has {n_layers}"
            )
        layers = list(range(k)) if match[1] == "first" else list(range(n_layers - k, n_layers))
        what = repr(selection)
    else:
        match = _GROUP_RE.match(selection)
        if not match:
            _check_layer_string(selection)  # raises the helpful message
        parts = _FRACTIONS[match[2]]
        i = _ORDINALS.index(match[1])
        if groups == "paper":
            layers = paper_layer_group(selection, n_layers)
        else:
            layers = list(range(i * n_layers // parts, (i + 1) * n_layers // parts))
        what = repr(selection) + (" (the paper's layer groups)" if groups == "paper" else "")
    if not layers:
        raise LayerRangeError(f"layer selection {what} selects no layer of a {n_layers}-layer model")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Span(_Strict):
    """The tokens covering a named piece of the prompt, e.g. ``{"span": "first_actor"}``.

    The text of each span is given per prompt when running (``spans=[{"first_actor": "Zendaya"}]``)
    and located with the tokenizer's character offsets, so leading spaces and BPE merges are
    handled; every token that overlaps the span's characters is selected."""

    span: str = Field(min_length=1, description="Name of the span, e.g. 'first_actor'.")


class Last(_Strict):
    """The last real token of the prompt (padding-aware); during generation, each new token."""

    last: Literal[True] = True


class Index(_Strict):
    """Explicit token indices; negative ones count from the end (``-1`` is the last token)."""

    index: list[int] = Field(min_length=1)


class Other(_Strict):
    """Every position that no other selector of the spec names (the paper's ``other``)."""

    other: Literal[True] = True


class All(_Strict):
    """Every real token of the prompt."""

    all: Literal[True] = True


class Not(_Strict):
    """Every real token except those the inner selectors name, e.g. ``{"not": [{"last": true}]}``
    grafts the complement of the last token (the paper's ``LT^C``)."""

    not_: list["PositionSelector"] = Field(alias="not", min_length=1)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_POSITION_KINDS = ("span", "last", "index", "other", "all", "not")


def _position_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in _POSITION_KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    for kind, cls in (("span", Span), ("last", Last), ("index", Index), ("other", Other),
                      ("all", All), ("not", Not)):
        if isinstance(value, cls):
            return kind
    return None


PositionSelector = Annotated[
    Union[
        Annotated[Span, Tag("span")],
        Annotated[Last, Tag("last")],
        Annotated[Index, Tag("index")],
        Annotated[Other, Tag("other")],
        Annotated[All, Tag("all")],
        Annotated[Not, Tag("not")],
    ],
    Discriminator(
        _position_kind,
        custom_error_type="invalid_position",
        custom_error_message=(
            "a position selector is exactly one of {\"span\": NAME}, {\"last\": true}, "
            "{\"index\": [I, ...]}, {\"other\": true}, {\"all\": true}, {\"not\": [SELECTOR, ...]}"
        ),
    ),
]
Not.model_rebuild()

# ---------------------------------------------------------------------------------------------
# Rules and specs
# ---------------------------------------------------------------------------------------------


class WeightSelection(_Strict):
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

    Example: ``{"rank": 4}``, ``{"top_percent": 5, "per": "layer"}``, ``{"neurons": [7, 12]}``.
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


class GraftRule(_Strict):
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
            return _check_layer_string(value)
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


class ModelRef(_Strict):
    """Which model a spec was written for (informational; not enforced)."""

    name: str
    revision: str | None = None


class GraftSpec(_Strict):
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
        from ..util.inputs import check_no_duplicate_keys, decode_utf8

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
        from ..util.inputs import read_text

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
            elif part in _POSITION_KINDS and loc.endswith("]") and ".positions" in loc:
                continue  # the union tag adds noise: rules[0].positions[1].span.span
            else:
                loc += ("." if loc else "") + str(part)
        if item["type"] == "json_invalid":
            loc = "(JSON)"
        lines.append(f"  {loc or '(top level)'}: {item['msg']}")
    return "\n".join(lines)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`GraftSpec` (published as ``docs/graft-spec.schema.json``)."""
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
        from ..errors import ArgumentError

        raise ArgumentError(f"spec: Input should be a GraftSpec, a spec file path or a dict, got {spec!r} "
                            f"({type(spec).__name__})")
    return GraftSpec.load(spec)


# Short names for the common cases.
def everywhere_except(*selectors: Any) -> Not:
    """``Not(not_=[...])`` with a readable name: ``everywhere_except(Span(span="first_actor"))``."""
    return Not(**{"not": list(selectors)})
