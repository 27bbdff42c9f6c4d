"""Position selectors of a spec: which tokens a rule grafts (a named span, the last token,
indices, the others, all, or the complement of other selectors).

Example:
    >>> from pydantic import TypeAdapter
    >>> TypeAdapter(PositionSelector).validate_python({"not": [{"last": True}]})
    Not(not_=[Last(last=True)])
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class Documented(BaseModel):
    """A spec model whose JSON Schema ``description`` is its docstring's prose, without the
    runnable ``Example:`` section (the doctests are for Python readers, not for a schema's users)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if isinstance(target.get("description"), str):
            target["description"] = re.split(r"\n\s*Examples?:\s*\n", target["description"], maxsplit=1)[0].rstrip()
        return schema


class Strict(Documented):
    """The base of every spec model: unknown fields are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Span(Strict):
    """The tokens covering a named piece of the prompt, e.g. ``{"span": "first_actor"}``.

    The text of each span is given per prompt when running (``spans=[{"first_actor": "Zendaya"}]``)
    and located with the tokenizer's character offsets, so leading spaces and BPE merges are
    handled; every token that overlaps the span's characters is selected.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Span
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[Span(span="first_actor")])])
        >>> g.plan(spec, ["Ada Lovelace stars in"], spans=[{"first_actor": "Ada Lovelace"}]).modules[0].cols.tolist()
        [1, 2, 3, 4]
    """

    span: str = Field(min_length=1, description="Name of the span, e.g. 'first_actor'.")


class Last(Strict):
    """The last real token of the prompt (padding-aware); during generation, each new token.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[Last()])])
        >>> g.plan(spec, ["Ada Lovelace stars in"]).modules[0].cols.tolist()
        [6]
    """

    last: Literal[True] = True


class Index(Strict):
    """Explicit token indices; negative ones count from the end (``-1`` is the last token).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Index
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[Index(index=[1, -2])])])
        >>> g.plan(spec, ["Ada Lovelace stars in"]).modules[0].cols.tolist()
        [1, 5]
    """

    index: list[int] = Field(min_length=1)


class Other(Strict):
    """Every position that no other selector of the spec names (the paper's ``other``).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last, Other
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[Last()]),
        ...                         GraftRule(components=["o"], layers=[0], positions=[Other()])])
        >>> [(m.path, m.cols.tolist()) for m in g.plan(spec, ["Ada Lovelace stars in"]).modules]
        [('model.layers.0.self_attn.o_proj', [0, 1, 2, 3, 4, 5]), ('model.layers.0.mlp', [6])]
    """

    other: Literal[True] = True


class All(Strict):
    """Every real token of the prompt.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, All
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[All()])])
        >>> g.plan(spec, ["Ada Lovelace stars in"]).modules[0].cols.tolist()
        [0, 1, 2, 3, 4, 5, 6]
    """

    all: Literal[True] = True


class Not(Strict):
    """Every real token except those the inner selectors name, e.g. ``{"not": [{"last": true}]}``
    grafts the complement of the last token (the paper's ``LT^C``).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last, Not
        >>> from nngraft.testing import tiny_pair
        >>> g = Grafter(*tiny_pair("llama"))  # "Ada Lovelace stars in": <s> ▁Ada ▁Lov ela ce ▁stars ▁in
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers=[0], positions=[Not(not_=[Last()])])])
        >>> g.plan(spec, ["Ada Lovelace stars in"]).modules[0].cols.tolist()
        [0, 1, 2, 3, 4, 5]
    """

    not_: list["PositionSelector"] = Field(alias="not", min_length=1)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


POSITION_KINDS = ("span", "last", "index", "other", "all", "not")


def _position_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in POSITION_KINDS if k in value]
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
