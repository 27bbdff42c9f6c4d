"""Plots and tables label, group and order specs by what they graft (components, layers,
positions), never by their names: a user's own specs are drawn exactly like the built-in ones."""

from __future__ import annotations

import json

import pytest

from nngraft import Grafter
from nngraft.spec import GraftRule, GraftSpec, Last, Span
from nngraft.study import plot as plot_module
from nngraft.study.grids import QUARTERS, paper_specs
from nngraft.study.labels import component_label, describe, manifest_facets
from nngraft.study.results import load_manifest, load_results
from nngraft.study.summary import summary_table
from nngraft.study.sweep import SweepConfig, run_sweep


def _json(spec: GraftSpec) -> dict:
    return json.loads(spec.to_json())


def test_a_custom_lt_attn_grafting_o_too_is_not_the_papers_attn():
    mine = GraftSpec(name="lt_attn", rules=[GraftRule(components=["q", "k", "v", "o"], positions=[Last()])])
    assert describe(_json(mine)).label == "LT: attn+o"
    assert describe(_json(paper_specs()["lt_attn"])).label == "LT: attn"
    # nngraft's own attn group is q, k, v, their norms and o: the paper's attn + o
    group = GraftSpec(name="x", rules=[GraftRule(components=["attn"], positions=[Last()])])
    assert describe(_json(group)).label == "LT: attn+o"
    assert component_label(["mlp"]) == component_label(["gate", "up", "down"]) == "ffn"
    assert component_label(["up", "o"]) == "o+ffn_up"
    assert component_label(["all"]) == "" and component_label(["everything"]) == "all+embed+pos_embed+ln_final+lm_head"


def test_labels_of_the_paper_specs_match_the_paper_notation():
    specs = paper_specs(entity="drug")
    spans = {"drug": "FE", "movie_title": "M", "relation": "R"}
    got = {n: describe(_json(specs[n]), spans).label for n in
           ["p", "f", "fe", "lt", "fe_lt", "fe_lt_complement", "not_fe", "not_lt", "lt_o_ffn", "fe+lm_head",
            "lt_ffn_second_quarter", "lm_head_only"]}
    assert got == {"p": "P", "f": "F", "fe": "FE", "lt": "LT", "fe_lt": "FE+LT", "fe_lt_complement": "(FE+LT)ᶜ",
                   "not_fe": "FEᶜ", "not_lt": "LTᶜ", "lt_o_ffn": "LT: o+ffn", "fe+lm_head": "FE +head",
                   "lt_ffn_second_quarter": "LT: ffn, 2nd quarter", "lm_head_only": "LM head at LT"}
    # unnamed spans keep their own names
    assert describe(_json(specs["fe"]), {}).label == "drug"


def test_same_content_under_any_name_gets_the_same_label_and_place():
    paper = paper_specs()
    renamed = {f"zz_{i}": s.model_copy(update={"name": f"zz_{i}"}) for i, s in enumerate(paper.values())}
    for (name, spec), other in zip(paper.items(), renamed.values()):
        a, b = describe(_json(spec), name=name), describe(_json(other), name=other.name)
        if a.category != "other":  # named-donor specs fall back to their names
            assert (a.label, a.category, a.order) == (b.label, b.category, b.order), name


def test_layer_groups_sort_by_depth_not_alphabetically():
    names = ["first", "fourth", "second", "third"]  # alphabetical, as a results file might list them
    specs = [GraftSpec(name=f"mine_{n}", rules=[GraftRule(components=["o"], layers=f"{n}_quarter",
                                                          positions=[Last()])]) for n in names]
    ordered = sorted(specs, key=lambda s: describe(_json(s)).order)
    assert [s.name for s in ordered] == ["mine_first", "mine_second", "mine_third", "mine_fourth"]
    two_rules = [GraftSpec(name=f"sel_{n}", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                                                   GraftRule(components=["all"], layers=f"{n}_quarter",
                                                             positions=[Last()])]) for n in names]
    ordered = sorted(two_rules, key=lambda s: describe(_json(s)).order)
    assert [s.name for s in ordered] == ["sel_first", "sel_second", "sel_third", "sel_fourth"]
    assert describe(_json(ordered[1])).label == "FE & LT (2nd quarter)"
    eighths = sorted(["fourth_eighth", "first_quarter", "eighth_eighth", "first_eighth"],
                     key=lambda g: describe({"rules": [{"components": ["o"], "layers": g,
                                                        "positions": [{"last": True}]}]}).order)
    assert eighths == ["first_quarter", "first_eighth", "fourth_eighth", "eighth_eighth"]


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A drug run with custom specs under misleading names, in alphabetical order."""
    root = tmp_path_factory.mktemp("labels")
    facts = root / "drugs.jsonl"
    facts.write_text("".join(json.dumps({"id": f"d{i}", "drug": d, "maker": m}) + "\n" for i, (d, m) in
                             enumerate([("Zolvatrin", "Harlow Labs"), ("Quennamide", "Bexley Pharma"),
                                        ("Ostrafen", "Calder Works")])))
    specs = [GraftSpec(name="lt_attn", rules=[GraftRule(components=["q", "k", "v", "o"], positions=[Last()])]),
             GraftSpec(name="entity_and_last", rules=[GraftRule(components=["all"],
                                                                positions=[Span(span="drug"), Last()])]),
             GraftSpec(name="a_only_the_drug", rules=[GraftRule(components=["all"], positions=[Span(span="drug")])])]
    specs += [GraftSpec(name=f"q_{n}", rules=[GraftRule(components=["q", "k", "v", "o"], layers=f"{n}_quarter",
                                                        positions=[Last()])]) for n in ("first", "fourth", "second", "third")]
    paths = [str(s.save(root / f"{s.name}.json")) for s in specs]
    config = SweepConfig.model_validate({
        "models": [{"name": "tiny", "tiny": "llama", "tiny_layers": 4}], "spans": {"entity": "drug"},
        "data": {"facts": str(facts), "templates": ["{drug} is made by"], "answer_field": "maker"},
        "grid": "main", "specs": paths, "check_baselines": 0})
    outcome = run_sweep(config, output=root / "out", show_progress=False)
    return outcome.results


def test_plots_group_label_and_order_by_content(custom_run, monkeypatch, tmp_path):
    charts, maps = {}, {}

    def fake_bar(aggs, *, title, stem, facets=None, **kw):
        names = [a.keys["spec"] for a in aggs]
        charts[stem.name] = [facets[n].label for n in names]
        return []

    def fake_heatmap(values, *, rows, cols, title, stem, **kw):
        maps[stem.name] = (list(rows), list(cols), title)
        return []

    monkeypatch.setattr(plot_module, "bar_chart", fake_bar)
    monkeypatch.setattr(plot_module, "heatmap", fake_heatmap)
    plot_module.plot_results(custom_run, tmp_path / "plots")
    positions = charts["bars_positions_tiny_drug-is-made-by"]
    assert positions == ["P", "F", "FE", "FE", "LT", "FE+LT", "FE+LT", "(FE+LT)ᶜ", "FEᶜ", "LTᶜ"]
    assert charts["bars_components_tiny_drug-is-made-by"] == ["P", "F", "LT", "LT: attn+o"]
    assert "bars_other_tiny_drug-is-made-by" not in charts  # the quarter specs went to a heatmap
    (rows, cols, title), = maps.values()
    assert rows == ["attn+o"] and cols == [f"{q}" for q in QUARTERS]
    assert "F's weights at LT, by layer quarter" in title


def test_summary_table_labels_by_content(custom_run):
    from rich.console import Console

    rows = load_results(custom_run)
    console = Console(width=250, record=True)
    console.print(summary_table(rows, k=5, title="t", manifest=load_manifest(custom_run)))
    text = console.export_text()
    assert "lt_attn (LT: attn+o)" in text and "q_fourth (LT: attn+o, 4th quarter)" in text
    assert "a_only_the_drug (FE)" in text and "not_fe (FEᶜ)" in text
    facets = manifest_facets(load_manifest(custom_run))
    assert facets["entity_and_last"].label == facets["fe_lt"].label == "FE+LT"


def test_models_off_a_terminal_prints_whole_names(tmp_path, monkeypatch, capsys):
    """``nngraft models`` piped to a file: every name and path whole, one model a line."""
    from nngraft.cli import main

    long = "SmolLM2-135M-Instruct-with-a-very-long-conversion-name-that-a-table-would-cut-98362432-v1"
    folder = tmp_path / "cache" / "models" / long
    folder.mkdir(parents=True)
    (folder / "nngraft-conversion.json").write_text("{}")
    monkeypatch.setenv("NNGRAFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{long}\tconversion\t0 MiB\t{folder}"]


def test_generation_result_prints_one_short_line():
    from nngraft.testing import tiny_pair

    P, F, tok = tiny_pair("llama")
    g = Grafter(P, F, tok)
    res = g.generate(paper_specs()["lt"], ["Ada Lovelace stars in"], max_new_tokens=4)
    text = repr(res)
    assert text.startswith("GenerationResult(1 rows × 4 new tokens, texts=[") and "step_logits: 4 × (1, " in text
    assert len(text) < 200 and "tensor" not in text
    assert res.step_logits[0].shape[0] == 1 and g.model is P
