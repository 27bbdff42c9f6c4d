"""GraftSpec: JSON round trips, JSON Schema, validation errors that name the rule and field,
layer-group resolution."""

from __future__ import annotations

import inspect
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nngraft import (
    All,
    GraftRule,
    GraftSpec,
    Index,
    Last,
    LayerRange,
    LayerRangeError,
    Not,
    Other,
    Span,
    SpecError,
    resolve_layers,
    spec_json_schema,
)
from nngraft.spec import COMPONENT_GROUPS, COMPONENTS
from tests.helpers import ROOT


def test_design_sketch_examples_parse():
    fe_lt = GraftSpec.from_json("""{
      "schema_version": "1", "name": "fe_lt",
      "description": "Graft all components at the first-actor tokens and at the last token.",
      "rules": [{"components": ["all"], "layers": "all",
                 "positions": [{"span": "first_actor"}, {"last": true}]}]}""")
    assert fe_lt.rules[0].positions == [Span(span="first_actor"), Last()]
    q4 = GraftSpec.from_json('{"schema_version": "1", "name": "lt_ffn_q4", "rules": [{"components": '
                             '["gate", "up", "down"], "layers": "fourth_quarter", "positions": [{"last": true}]}]}')
    assert q4.rules[0].layers == "fourth_quarter"


def test_round_trip_and_hash(tmp_path):
    spec = GraftSpec(name="mix", rules=[
        GraftRule(components=["q", "k"], layers=[0, -1], positions=[Index(index=[0, -1])]),
        GraftRule(components=["mlp"], layers=LayerRange(start=2, stop=-1),
                  positions=[Not(**{"not": [Span(span="first_actor"), Last()]})]),
        GraftRule(components=["everything"], positions=[All()]),
        GraftRule(components=["o"], layers="last:2", positions=[Other()]),
    ])
    path = spec.save(tmp_path / "mix.json")
    loaded = GraftSpec.load(path)
    assert loaded == spec
    assert json.loads(path.read_text())["rules"][1]["positions"][0] == {"not": [{"span": "first_actor"}, {"last": True}]}
    assert loaded.content_hash() == spec.content_hash()
    renamed = spec.model_copy(update={"name": "other", "description": "same rules"})
    assert renamed.content_hash() == spec.content_hash()
    changed = GraftSpec(rules=spec.rules[:1])
    assert changed.content_hash() != spec.content_hash()
    assert spec.rule_names_span() == {"first_actor"}


def test_json_schema_validates_shape():
    schema = spec_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    rule = schema["$defs"]["GraftRule"]
    assert rule["additionalProperties"] is False
    assert set(rule["properties"]) == {"components", "layers", "positions", "donor", "weights"}
    enum = rule["properties"]["components"]["items"]["enum"]
    assert set(enum) == set(COMPONENTS) | set(COMPONENT_GROUPS)


def test_the_schema_descriptions_carry_no_doctest():
    """The spec models' docstrings end in runnable examples; the JSON Schema keeps only the prose
    before them (a description that held the example would show ``>>>`` lines to schema users)."""
    from nngraft import GraftRule, GraftSpec, LayerRange, Span

    for schema in (spec_json_schema(), GraftSpec.model_json_schema(), LayerRange.model_json_schema(),
                   Span.model_json_schema()):  # nngraft's door and pydantic's own
        text = json.dumps(schema)
        assert ">>>" not in text and "Example:" not in text
    defs = spec_json_schema()["$defs"]
    assert ">>>" in GraftRule.__doc__ and ">>>" in Span.__doc__
    for model in (GraftRule, Span):
        prose = inspect.cleandoc(model.__doc__).split("\n\nExample:")[0]
        assert defs[model.__name__]["description"] == prose and len(prose) > 40


def test_published_schema_is_current():
    """docs/graft-spec.schema.json must be regenerated when the spec model changes."""
    from pathlib import Path

    published = ROOT / "docs" / "graft-spec.schema.json"
    assert json.loads(published.read_text()) == spec_json_schema(), "run: nngraft schema -o docs/graft-spec.schema.json"


@pytest.mark.parametrize("text,where,words", [
    ('{"rules": [{"components": ["q"], "positions": [{"last": true}]}', "(JSON)", "EOF"),
    ('{"rules": [], "colour": "red"}', "colour", "Extra inputs are not permitted"),
    ('{"rules": [{"components": ["gat"], "positions": [{"last": true}]}]}', "rules[0].components[0]", "'gate'"),
    ('{"rules": [{"components": ["q"], "positions": [{"last": true}]}, '
     '{"components": ["q"], "layers": "fifth_quarter", "positions": [{"last": true}]}]}', "rules[1].layers", "fifth_quarter"),
    ('{"rules": [{"components": ["q"], "positions": [{"lst": true}]}]}', "rules[0].positions[0]", "exactly one of"),
    ('{"rules": [{"components": ["q"], "positions": [{"span": "a", "last": true}]}]}', "rules[0].positions[0]", "exactly one of"),
    ('{"rules": [{"components": ["q"], "positions": []}]}', "rules[0].positions", "at least 1"),
    ('{"rules": [{"components": [], "positions": [{"last": true}]}]}', "rules[0].components", "at least 1"),
    ('{"rules": [{"components": ["q"], "layers": [], "positions": [{"last": true}]}]}', "rules[0].layers", "empty layer list"),
    ('{"rules": [{"components": ["everything"], "layers": "last:2", "positions": [{"all": true}]}]}', "rules[0]", "'everything'"),
    ('{"schema_version": "3", "rules": []}', "schema_version", "newer nngraft"),
])
def test_errors_name_rule_and_field(text, where, words):
    with pytest.raises(SpecError) as info:
        GraftSpec.from_json(text, source="my.json")
    message = str(info.value)
    assert "my.json" in message
    assert f"  {where}" in message
    assert words in message


def test_loading_missing_file_is_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file .*nope.json"):
        GraftSpec.load(tmp_path / "nope.json")


def test_loading_never_imports_names(tmp_path):
    """Specs are data: a component that looks like a Python path is just an invalid name."""
    with pytest.raises(SpecError, match="components"):
        GraftSpec.from_json('{"rules": [{"components": ["os.system"], "positions": [{"last": true}]}]}')


@pytest.mark.parametrize("selection,n,expected", [
    ("all", 4, [0, 1, 2, 3]),
    ("first_quarter", 16, [0, 1, 2, 3]),
    ("fourth_quarter", 16, [12, 13, 14, 15]),
    ("fourth_quarter", 18, [13, 14, 15, 16, 17]),
    ("first_quarter", 18, [0, 1, 2, 3]),
    ("third_eighth", 16, [4, 5]),          # the paper's code made this empty
    ("eighth_eighth", 16, [14, 15]),
    ("second_half", 30, list(range(15, 30))),
    ("last:4", 30, [26, 27, 28, 29]),
    ("first:2", 30, [0, 1]),
    ([0, -1], 12, [0, 11]),
    ([3, 3, 1], 12, [1, 3]),
    (LayerRange(start=4, stop=-2), 12, list(range(4, 10))),
])
def test_resolve_layers(selection, n, expected):
    assert resolve_layers(selection, n) == expected


@given(n=st.integers(min_value=1, max_value=96), parts=st.sampled_from([("quarter", 4), ("eighth", 8), ("half", 2)]))
@settings(max_examples=60, deadline=None)
def test_named_fractions_partition_the_layers(n, parts):
    name, k = parts
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"][:k]
    groups = []
    for o in ordinals:
        try:
            groups.append(resolve_layers(f"{o}_{name}", n))
        except LayerRangeError:
            assert n < k  # only tiny models can have empty parts
            groups.append([])
    assert sorted(sum(groups, [])) == list(range(n))
    if name == "eighth" and n >= 8:  # quarters nest exactly in eighths
        for q in range(4):
            assert resolve_layers(f"{ordinals[q]}_quarter", n) == groups[2 * q] + groups[2 * q + 1]


@pytest.mark.parametrize("selection,n,message", [
    ([12], 12, "layer 12 is out of range for a model with 12 layers"),
    ([-13], 12, "out of range"),
    ("last:0", 12, "needs 1 … 12 layers"),
    ("last:13", 12, "needs 1 … 12 layers"),
    ("first_eighth", 4, "selects no layer of a 4-layer model"),
    (LayerRange(start=10, stop=5), 12, "selects no layer"),
])
def test_resolve_layers_errors(selection, n, message):
    with pytest.raises(LayerRangeError, match=message):
        resolve_layers(selection, n)


_selectors = st.recursive(
    st.one_of(
        st.builds(Span, span=st.sampled_from(["first_actor", "movie_title"])),
        st.just(Last()), st.just(All()), st.just(Other()),
        st.builds(Index, index=st.lists(st.integers(-5, 5), min_size=1, max_size=3)),
    ),
    lambda inner: st.builds(lambda xs: Not(**{"not": xs}), st.lists(inner, min_size=1, max_size=2)),
    max_leaves=4,
)
_rules = st.builds(
    GraftRule,
    components=st.lists(st.sampled_from([c for c in COMPONENTS if c != "everything"] + ["attn", "mlp", "all"]),
                        min_size=1, max_size=3),
    layers=st.one_of(st.just("all"), st.sampled_from(["first_quarter", "last:1", "second_half"]),
                     st.lists(st.integers(-2, 1), min_size=1, max_size=2)),
    positions=st.lists(_selectors, min_size=1, max_size=3),
)


@given(st.lists(_rules, max_size=3), st.text(max_size=20))
@settings(max_examples=80, deadline=None)
def test_json_round_trip_is_identity(rules, name):
    spec = GraftSpec(name=name or "x", rules=rules)
    assert GraftSpec.from_json(spec.to_json()) == spec


def test_the_schema_validators_refuse_just_past_their_edge():
    """Each rule of the schema, at its edge (written against benchmarks/mutate_validators.py's
    planted mutants)."""
    from pydantic import ValidationError

    from nngraft import GraftRule, GraftSpec, Last

    rule = {"components": ["mlp"], "positions": [{"last": True}]}
    bad = [
        ({**rule, "weights": {"rank": 2, "top_percent": 5}}, "give exactly one of top_percent, rank, rows, columns, "
                                                             r"heads, neurons \(got top_percent, rank\)"),
        ({**rule, "weights": {}}, r"give exactly one of .* \(got none\)"),
        ({**rule, "weights": {"rank": 2, "per": "layer"}}, "per: 'layer' only applies to top_percent"),
        ({**rule, "layers": []}, "an empty layer list selects nothing"),
        ({"components": ["everything"], "layers": "last:1", "positions": [{"last": True}]},
         "'everything' includes the embeddings and the LM head"),
    ]
    for fields, message in bad:
        with pytest.raises(ValidationError, match=message):
            GraftRule.model_validate(fields)
    assert GraftRule.model_validate({**rule, "weights": {"top_percent": 5, "per": "layer"}}).weights.kind == "top_percent"
    assert GraftRule(components=["everything"], positions=[Last()]).layers == "all"
    for version, message in (("2", None), ("3", "written by a newer nngraft"), ("v1", "must be a number as a string"),
                             ("", "must be a number as a string")):
        if message is None:
            assert GraftSpec(schema_version=version).schema_version == version
        else:
            with pytest.raises(ValidationError, match=message):
                GraftSpec(schema_version=version)
    assert GraftSpec.model_validate({"layer_groups": "paper"}).schema_version == "2"  # the feature needs version 2
    assert GraftSpec.model_validate({"layer_groups": "paper", "schema_version": "1"}).schema_version == "2"
    assert GraftSpec.model_validate({}).schema_version == "1"
