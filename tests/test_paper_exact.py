"""Paper-exact variants: the paper's layer groups (``layer_groups: "paper"``) and its configs
(embeddings at every fully grafted position, no ``down`` in the complement, F's LM head at LT on
tied-embedding models), checked against the per-token reference (tests/helpers/reference.py) with the
paper's own swaps written out by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nngraft import GraftSpec, Grafter
from nngraft.arch import adapter_for
from nngraft.errors import LayerRangeError, SpecError
from nngraft.spec import resolve_layers
from nngraft.study.grids import PAPER_GRIDS, grid_specs, paper_exact, paper_exact_specs, paper_specs
from nngraft.testing import tiny_pair

from tests.helpers.reference import component_swaps, per_token_reference
from tests.helpers import ROOT

PROMPT = "Ada Lovelace stars in a movie alongside"
SPANS = {"first_actor": "Ada Lovelace"}


def _ranges(groups, n, how):
    out = []
    for g in groups:
        layers = resolve_layers(g, n, how)
        out.append((layers[0], layers[-1]))
    return out


def test_the_papers_quarters_put_the_remainder_in_the_last():
    quarters = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]
    assert _ranges(quarters, 30, "paper") == [(0, 6), (7, 13), (14, 20), (21, 29)]
    assert _ranges(quarters, 30, "even") == [(0, 6), (7, 14), (15, 21), (22, 29)]
    assert _ranges(quarters, 18, "paper") == [(0, 3), (4, 7), (8, 11), (12, 17)]  # Gemma: 4/4/4/6
    assert _ranges(quarters, 16, "paper") == _ranges(quarters, 16, "even")  # divisible by 4: the same
    assert _ranges(["first_half", "second_half"], 30, "paper") == [(0, 13), (14, 29)]


def test_the_papers_eighths_as_its_code_computed_them():
    # 30 layers, q = 7: [0, 3), [3, 7), [14, 10) = empty, [10, 14), [14, 17), [17, 21)
    assert resolve_layers("first_eighth", 30, "paper") == [0, 1, 2]
    assert resolve_layers("second_eighth", 30, "paper") == [3, 4, 5, 6]
    assert resolve_layers("fourth_eighth", 30, "paper") == [10, 11, 12, 13]
    assert resolve_layers("sixth_eighth", 30, "paper") == [17, 18, 19, 20]
    with pytest.raises(LayerRangeError, match="'third_eighth' \(the paper's layer groups\) selects no layer"):
        resolve_layers("third_eighth", 30, "paper")
    with pytest.raises(LayerRangeError, match="exposed no seventh or eighth eighth"):
        resolve_layers("seventh_eighth", 30, "paper")


def test_layer_groups_is_a_version_2_field():
    plain = paper_specs()["lt_o_fourth_quarter"]
    paper = plain.model_copy(update={"layer_groups": "paper"})
    assert json.loads(plain.to_json())["schema_version"] == "1" and "layer_groups" not in plain.to_json()
    loaded = GraftSpec.from_json(json.dumps({**json.loads(plain.to_json()), "layer_groups": "paper"}))
    assert loaded.layer_groups == "paper" and loaded.schema_version == "2"
    assert json.loads(loaded.to_json())["layer_groups"] == "paper"
    assert loaded.content_hash() != plain.content_hash() and paper.content_hash() == loaded.content_hash()
    with pytest.raises(SpecError, match="layer_groups"):
        GraftSpec.from_json(json.dumps({"name": "x", "layer_groups": "thirds", "rules": []}))
    with pytest.raises(SpecError, match="schema_version 3, written by a newer nngraft"):
        GraftSpec.from_json(json.dumps({"schema_version": "3", "name": "x", "rules": []}))


def test_paper_exact_variants_of_the_standard_specs():
    specs = paper_exact_specs(entity="drug")
    fe = specs["fe_paper"]
    assert fe.layer_groups == "paper" and [r.components for r in fe.rules] == [["embed", "all"]]
    assert [r.components for r in specs["lt_paper"].rules] == [["embed", "all"], ["lm_head"]]
    comp = specs["fe_lt_complement_paper"].rules
    assert len(comp) == 1 and "down" not in comp[0].components and "embed" in comp[0].components
    assert [r.components for r in specs["not_fe_paper"].rules][1] == ["lm_head"]  # LT is in FEᶜ
    assert specs["lt_attn_paper"].rules == paper_specs()["lt_attn"].rules  # buckets: only the layer groups
    assert [r.components for r in paper_exact(paper_specs()["lt"], tied=False).rules] == [["embed", "all"]]
    assert "fe_paper" not in {s.name for s in grid_specs("components_paper")}
    main = [s.name for s in grid_specs("main_paper", entity="drug")]
    assert main == ["p", "f"] + [n + "_paper" for n in PAPER_GRIDS["main"][2:]]
    assert "lt_o_third_eighth_paper" not in [s.name for s in grid_specs("layers_paper")]
    with pytest.raises(SpecError, match="paper-exact variants main_paper"):
        grid_specs("hybrid_paper")


def test_tied_embeddings_in_the_papers_code_swap_the_lm_head():
    """What the paper's code did: a deep copy of a tied P, F's embedding state dict loaded into it."""
    P, F, _ = tiny_pair("llama")
    copy_of_p = copy.deepcopy(P)
    copy_of_p.get_input_embeddings().load_state_dict(F.get_input_embeddings().state_dict())
    assert torch.equal(copy_of_p.get_output_embeddings().weight, F.get_output_embeddings().weight)


@pytest.mark.parametrize("name", ["fe_lt", "not_fe", "lt_o_fourth_quarter"])
def test_paper_exact_specs_match_the_per_token_reference(name):
    P, F, tok = tiny_pair("llama", n_layers=6)
    adapter = adapter_for(P)
    g = Grafter(P, F, tok)
    ids = tok(PROMPT)["input_ids"]
    fe = set(g.tokenize([PROMPT], [SPANS])[0].spans["first_actor"])
    last = len(ids) - 1

    def swaps(components, layers=range(6)):
        block, global_ = adapter.expand(list(components))
        out = [s for c in global_ for s in component_swaps(P, adapter, c, None)]
        return out + [s for c in block for layer in layers for s in component_swaps(P, adapter, c, layer)]

    no_down = ["ln_attn", "q", "k", "v", "o", "ln_mlp", "gate", "up"]  # llama: no q_norm/k_norm

    def table(t):  # the paper's swaps at token t, written out by hand
        if name == "fe_lt":
            return swaps(["embed", "all"]) + (swaps(["lm_head"]) if t == last else []) if t in fe or t == last else []
        if name == "not_fe":
            return [] if t in fe else swaps(["embed", *no_down]) + (swaps(["lm_head"]) if t == last else [])
        return swaps(["o"], layers=[3, 4, 5]) if t == last else []  # 6 layers: the paper's fourth quarter is 3-5

    expected, _ = per_token_reference(P, F, ids, table)
    spec = paper_exact(paper_specs()[name])
    actual = g.run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
    torch.testing.assert_close(actual[-1], expected[-1], atol=2e-5, rtol=1e-4)
    if name == "lt_o_fourth_quarter":  # and nngraft's even quarters graft another set of layers
        even = g.run(paper_specs()[name], [PROMPT], [SPANS]).logits[0]
        assert not torch.allclose(even, actual[-1], atol=1e-4)


def test_the_paper_exact_recipe_measures_each_difference_alone(tmp_path):
    from nngraft.study.results import load_results

    from tests.helpers.recipe_loader import load_recipe

    out = tmp_path / "out"
    assert load_recipe("paper_exact").main(["--tiny", "--n", "3", "--no-plot", "--no-progress", "-o", str(out)]) == 0
    rows = {(r["spec"], r["fact_id"]): r["prob"] for r in load_results(out)}
    specs = {s for s, _ in rows}
    assert {"fe_lt", "fe_lt+embed", "fe_lt_paper", "not_fe+embed-down", "fe+lt_mlp_fourth_quarter_paperq"} <= specs
    assert "fe_lt+embed-down" not in specs  # the same as fe_lt+embed: no complement, left out
    facts = {f for _, f in rows}

    def same(a, b):
        return all(abs(rows[a, f] - rows[b, f]) < 1e-6 for f in facts)

    # 6 layers: the first quarter is layer 0 both ways; the second is 1-2 (even) or 1 (paper)
    assert same("fe+lt_mlp_first_quarter", "fe+lt_mlp_first_quarter_paperq")
    assert not same("fe+lt_mlp_second_quarter", "fe+lt_mlp_second_quarter_paperq")
    assert not same("fe_lt", "fe_lt+embed") and not same("fe_lt+embed", "fe_lt_paper")  # the tied head at LT
    assert same("fe+embed", "fe_paper")  # FE is not the last token: no head, layer groups unused


def test_the_paper_md_command_runs_both_grids(tmp_path, monkeypatch):
    """docs/paper.md's `nngraft run --grid main --grid main_paper …`, with a tiny pair for the models."""
    import re
    import shlex
    from pathlib import Path

    from nngraft.cli import main
    from nngraft.study.data import make_facts, save_facts
    from nngraft.study.results import load_manifest, load_results

    text = (ROOT / "docs" / "paper.md").read_text()
    block = re.search(r"## Paper-exact variants.*?```bash\n(.*?)```", text, flags=re.S)[1]
    argv = shlex.split(block.replace("\\\n", " "))[1:]
    i = argv.index("--model")
    assert argv[i:i + 4] == ["--model", "smollm2", "--donor", "runs/sft/smollm2-fmfa"]
    monkeypatch.chdir(tmp_path)
    save_facts(make_facts("fake_movies_fake_actors", 3, 0), tmp_path / "runs/sft/smollm2-fmfa/facts.jsonl")
    assert main([*argv[:i], "--tiny", "llama", *argv[i + 4:], "-o", "out", "--no-progress", "--quiet"]) == 0
    specs = {r["spec"] for r in load_results(tmp_path / "out")}
    assert specs == set(PAPER_GRIDS["main"]) | {n + "_paper" for n in PAPER_GRIDS["main"][2:]}
    assert load_manifest(tmp_path / "out")["specs"]["fe_lt_paper"]["spec"]["layer_groups"] == "paper"
