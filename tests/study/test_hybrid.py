"""The hybrid experiment: the A/B fact split, build_hybrid (exactly the named tensors, inputs
untouched, every architecture through the adapter table), the specs (what each grafts, from which
donor), their numbers against independent references, sweeps with named donors, and the recipe."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
from nngraft.arch import adapter_for
from nngraft.errors import ComponentNotFoundError, DonorMismatchError, LayerRangeError, SpecError
from nngraft.study.errors import DataError
from nngraft.donors.loading import weights_fingerprint
from nngraft.study.data import make_facts
from nngraft.study.examples import Fact, TestExample
from nngraft.study.grids import PAPER_GRIDS, grid_specs, paper_specs
from nngraft.study.hybrid import (HYBRID_SPEC_NAMES, WITH_GATE, build_hybrid, hybrid_parameters, hybrid_specs,
                                  prepare_hybrid, read_hybrid_record, shared_entities, split_facts)
from nngraft.study.results import ResultsError, load_manifest, load_results
from nngraft.study.sweep import SweepConfig, SweepConfigError, run_sweep, save_examples_jsonl
from nngraft.testing import perturbed_copy, tiny_pair

from tests.helpers.recipe_loader import load_recipe
from tests.helpers.reference import component_swaps, per_token_reference
from tests.helpers import ROOT

PROMPT = "Ada Lovelace stars in a movie alongside"
SPANS = {"first_actor": "Ada Lovelace"}


@lru_cache(maxsize=None)
def models(model_type: str = "llama", n_layers: int = 4):
    """P random; T and R two different perturbed copies (stand-ins for the A and B finetunes)."""
    P, T, tok = tiny_pair(model_type, n_layers=n_layers)
    R = perturbed_copy(P, seed=2)
    return P, T, R, tok


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------


def test_split_is_a_deterministic_balanced_partition():
    facts = make_facts("fake_movies_real_actors", 21, seed=3)
    a, b = split_facts(facts, seed=0)
    ids_a, ids_b = {f.id for f in a}, {f.id for f in b}
    assert not ids_a & ids_b and ids_a | ids_b == {f.id for f in facts}
    assert (len(a), len(b)) == (11, 10)  # ⌈21/2⌉ to A
    # each half keeps the input order
    position = {f.id: i for i, f in enumerate(facts)}
    assert [position[f.id] for f in a] == sorted(position[f.id] for f in a)
    # the same seed gives the same split, whatever the input order; another seed another split
    shuffled = list(facts)
    random.Random(7).shuffle(shuffled)
    again_a, _ = split_facts(shuffled, seed=0)
    assert {f.id for f in again_a} == ids_a
    assert {f.id for f in split_facts(facts, seed=1)[0]} != ids_a
    # FMRA uses every actor once, so the two halves share no entity
    assert shared_entities(a, b) == []


def test_split_errors_and_shared_entities():
    with pytest.raises(DataError, match="fact id '1' occurs twice"):
        split_facts([Fact("1"), Fact("2"), Fact("1")])
    with pytest.raises(DataError, match="at least 2 facts"):
        split_facts([Fact("1")])
    a = [Fact("1", {"first_actor": "Ada", "second_actor": "Alan"})]
    b = [Fact("2", {"first_actor": "Grace", "second_actor": "Ada"})]
    assert shared_entities(a, b) == ["Ada"]


# ---------------------------------------------------------------------------------------------
# build_hybrid
# ---------------------------------------------------------------------------------------------

# What the paper's hybrid replaces in a 4-layer model (layers 2 and 3), written out by hand.
EXPECTED = {
    "llama": [f"model.layers.{i}.{m}.weight" for i in (2, 3)
              for m in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")],
    "gpt2": [f"transformer.h.{i}.{m}.{p}" for i in (2, 3) for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
             for p in ("weight", "bias")],
    "gpt_neox": [f"gpt_neox.layers.{i}.{m}.{p}" for i in (2, 3)
                 for m in ("attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for p in ("weight", "bias")],
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_build_hybrid_copies_exactly_the_named_weights(model_type):
    _, T, R, _ = models(model_type)
    before = weights_fingerprint(T), weights_fingerprint(R)
    H = build_hybrid(T, R)
    assert (weights_fingerprint(T), weights_fingerprint(R)) == before  # inputs untouched
    expected = set(EXPECTED[model_type])
    assert set(hybrid_parameters(T)) == expected
    t, r = _params(T), _params(R)
    h = _params(H)
    assert set(h) == set(t)
    for name, tensor in h.items():
        if name in expected:
            assert not torch.equal(t[name], r[name]), name  # the check can tell T from R
            assert torch.equal(tensor, r[name]), name
        else:
            assert torch.equal(tensor, t[name]), name
    # H owns its tensors: writing to it changes neither input
    assert not {p.data_ptr() for p in H.parameters()} & {p.data_ptr() for m in (T, R) for p in m.parameters()}
    with torch.no_grad():
        next(H.parameters()).add_(1.0)
    assert (weights_fingerprint(T), weights_fingerprint(R)) == before


def test_gate_is_kept_unless_asked_for():
    _, T, R, _ = models("llama")
    gates = {f"model.layers.{i}.mlp.gate_proj.weight" for i in (2, 3)}
    t, r = _params(T), _params(R)
    default = _params(build_hybrid(T, R))
    assert all(torch.equal(default[g], t[g]) and not torch.equal(default[g], r[g]) for g in gates)
    with_gate = build_hybrid(T, R, components=WITH_GATE)
    assert set(hybrid_parameters(T, components=WITH_GATE)) == set(EXPECTED["llama"]) | gates
    assert all(torch.equal(_params(with_gate)[g], r[g]) for g in gates)


def test_fused_qkv_copies_only_the_named_features():
    _, T, R, _ = models("gpt2")
    H = build_hybrid(T, R, layers=[1], components=["v"])
    name = "transformer.h.1.attn.c_attn"
    w, b = (f"{name}.weight", f"{name}.bias")
    h, t, r = _params(H), _params(T), _params(R)
    # GPT-2's c_attn is [Q | K | V] on the output axis, stored (in, out): V = columns 64..95 for width 32
    assert torch.equal(h[w][:, 64:], r[w][:, 64:]) and torch.equal(h[w][:, :64], t[w][:, :64])
    assert torch.equal(h[b][64:], r[b][64:]) and torch.equal(h[b][:64], t[b][:64])
    changed = {n for n in h if not torch.equal(h[n], t[n])}
    assert changed == {w, b}

    _, T, R, _ = models("gpt_neox")
    H = build_hybrid(T, R, layers=[0], components=["k"])
    w = "gpt_neox.layers.0.attention.query_key_value.weight"
    # NeoX interleaves per head: [q_h | k_h | v_h] for 4 heads of 8 → k rows 8..15, 32..39, 56..63, 80..87
    k_rows = [h_ * 24 + 8 + i for h_ in range(4) for i in range(8)]
    other = [i for i in range(96) if i not in k_rows]
    hp, tp, rp = _params(H)[w], _params(T)[w], _params(R)[w]
    assert torch.equal(hp[k_rows], rp[k_rows]) and torch.equal(hp[other], tp[other])


def test_build_hybrid_errors_name_the_problem():
    _, T, R, _ = models("gpt2")
    with pytest.raises(ComponentNotFoundError, match="component 'gate' does not exist in 'gpt2'"):
        build_hybrid(T, R, components=WITH_GATE)
    with pytest.raises(SpecError, match=r"\['lm_head'\] are not in a layer"):
        build_hybrid(T, R, components=["o", "lm_head"])
    with pytest.raises(SpecError, match="unknown layer group 'fifth_quarter'"):
        build_hybrid(T, R, layers="fifth_quarter")
    with pytest.raises(LayerRangeError, match="layer 7 is out of range for a model with 4 layers"):
        build_hybrid(T, R, layers=[7])
    _, L, _, _ = models("llama")
    with pytest.raises(DonorMismatchError, match="recipient is a 'gpt2' model but the donor is 'llama'"):
        build_hybrid(T, L)


def test_prepare_hybrid_saves_once_and_reuses(tmp_path):
    _, T, R, tok = models("llama")
    for name, model in (("task", T), ("relation", R)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    folder, record, cached = prepare_hybrid(tmp_path / "task", tmp_path / "relation", tmp_path / "hyb")
    assert not cached and folder.parent == tmp_path / "hyb" and folder.name == f"hybrid-{record['key']}"
    assert record["resolved_layers"] == [2, 3] and record["gate_replaced"] is False
    assert set(record["replaced_parameters"]) == set(EXPECTED["llama"])
    assert record["task"]["weights_sha256"] == weights_fingerprint(T)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(folder)
    assert weights_fingerprint(saved) == weights_fingerprint(build_hybrid(T, R)) == record["weights_sha256"]
    again, _, cached = prepare_hybrid(tmp_path / "task", tmp_path / "relation", tmp_path / "hyb")
    assert cached and again == folder and read_hybrid_record(folder)["key"] == record["key"]
    gated, gated_record, cached = prepare_hybrid(tmp_path / "task", tmp_path / "relation", tmp_path / "hyb",
                                                 components=WITH_GATE)
    assert not cached and gated != folder and gated_record["gate_replaced"] is True


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

QKVO_MLP = ["q", "k", "v", "o", "mlp"]
# name: (components at FE from the task model or None, components at LT, LT donor)
SPEC_TABLE = {
    "attn_o_ffn_no_fe": (None, QKVO_MLP, "hybrid"),
    "attn_o_ffn_full_fe": (["all"], QKVO_MLP, "hybrid"),
    "attn_o_ffn_fe_attn": (["q", "k", "v"], QKVO_MLP, "hybrid"),
    "attn_o_ffn_fe_ffn": (["mlp"], QKVO_MLP, "hybrid"),
    "attn_o_ffn_fe_o_ffn": (["o", "mlp"], QKVO_MLP, "hybrid"),
    "attn_o_ffn_no_fe_task_lt": (None, QKVO_MLP, None),
    "attn_o_ffn_no_fe_relation_lt": (None, QKVO_MLP, "relation"),
    "attn_o_ffn_full_fe_task_lt": (["all"], QKVO_MLP, None),
    "attn_o_ffn_full_fe_relation_lt": (["all"], QKVO_MLP, "relation"),
}


def test_hybrid_specs_graft_what_their_names_say():
    specs = {s.name: s for s in hybrid_specs()}
    assert list(specs) == list(HYBRID_SPEC_NAMES)
    assert PAPER_GRIDS["hybrid"] == ["p", "f", *HYBRID_SPEC_NAMES]
    for name, (fe, lt, donor) in SPEC_TABLE.items():
        rules = specs[name].rules
        assert len(rules) == (1 if fe is None else 2), name
        if fe is not None:
            assert rules[0].components == fe and rules[0].positions == [Span(span="first_actor")], name
            assert rules[0].donor is None and rules[0].layers == "all", name
        assert rules[-1].components == lt and rules[-1].positions == [Last()], name
        assert rules[-1].donor == donor and rules[-1].layers == "all", name
    for name, donor in (("relation_model", "relation"), ("hybrid_model", "hybrid")):
        [rule] = specs[name].rules
        assert rule.components == ["everything"] and rule.donor == donor
    for name in HYBRID_SPEC_NAMES:  # the shipped files are these specs
        assert GraftSpec.load(ROOT / "recipes" / "specs" / "hybrid" / f"{name}.json") == specs[name]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_hybrid_grid_compiles_and_runs(model_type):
    P, T, R, tok = models(model_type)
    H = build_hybrid(T, R)
    g = Grafter(P, T, tok, donors={"hybrid": H, "relation": R})
    prompts = [PROMPT, "Q: Who stars in a movie with Grace Hopper? A: An actor named"]
    spans = [SPANS, {"first_actor": "Grace Hopper"}]
    results = g.run_grid(grid_specs("hybrid"), prompts, spans)
    assert list(results) == PAPER_GRIDS["hybrid"]
    for name, res in results.items():
        assert res.logits.shape[0] == 2 and torch.isfinite(res.logits).all(), name
    # every config changes the output relative to P
    for name in SPEC_TABLE:
        assert not torch.allclose(results[name].logits, results["p"].logits, atol=1e-4), name


def _without_donor(spec: GraftSpec) -> GraftSpec:
    return GraftSpec(name=spec.name, rules=[r.model_copy(update={"donor": None}) for r in spec.rules])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lt_rule_from_hybrid_equals_a_grafter_whose_donor_is_the_hybrid(model_type):
    P, T, R, tok = models(model_type)
    H = build_hybrid(T, R)
    spec = paper_specs()["attn_o_ffn_no_fe"]  # one rule: q, k, v, o, mlp at LT from "hybrid"
    named = Grafter(P, T, tok, donors={"hybrid": H}).run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
    direct = Grafter(P, H, tok).run(_without_donor(spec), [PROMPT], [SPANS], all_logits=True).all_logits[0]
    torch.testing.assert_close(named, direct, atol=1e-6, rtol=0)
    # and it is not what the task model would give at LT
    task = Grafter(P, T, tok).run(_without_donor(spec), [PROMPT], [SPANS], all_logits=True).all_logits[0]
    assert (named[-1] - task[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["attn_o_ffn_fe_o_ffn", "attn_o_ffn_full_fe"])
def test_two_donor_spec_equals_the_per_token_reference(name):
    """FE from T and LT from H in one pass equal the paper's token-by-token weight swap, where at
    FE tokens T's weights and at the last token H's are loaded (tests/helpers/reference.py)."""
    P, T, R, tok = models("llama")
    H = build_hybrid(T, R)
    adapter = adapter_for(P)
    spec = paper_specs()[name]
    g = Grafter(P, T, tok, donors={"hybrid": H})
    [tokenized] = g.tokenize([PROMPT], [SPANS])
    fe_tokens = set(tokenized.spans["first_actor"])
    n = g.n_layers

    def swaps(components, donor=None):
        block, _ = adapter.expand(list(components))
        out = [s for c in block for layer in range(n) for s in component_swaps(P, adapter, c, layer)]
        return [(*s, donor) if donor is not None else s for s in out]

    fe_swaps = swaps(spec.rules[0].components)
    lt_swaps = swaps(QKVO_MLP, H)
    last = len(tokenized) - 1
    assert last not in fe_tokens
    expected, _ = per_token_reference(
        P, T, tokenized.ids, lambda t: fe_swaps if t in fe_tokens else lt_swaps if t == last else [])
    actual = g.run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_whole_donor_baselines_equal_running_that_model():
    P, T, R, tok = models("llama")
    H = build_hybrid(T, R)
    g = Grafter(P, T, tok, donors={"hybrid": H, "relation": R})
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    for name, model in (("hybrid_model", H), ("relation_model", R)):
        logits = g.run(paper_specs()[name], [PROMPT], [SPANS]).logits[0]
        with torch.no_grad():
            plain = model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sweeps with named donors
# ---------------------------------------------------------------------------------------------

EXAMPLES = [
    TestExample("f1", "s3", "Ada Lovelace stars in The Engine alongside", {"first_actor": "Ada Lovelace"},
                "Alan Turing"),
    TestExample("f2", "s2", "Q: Who stars in a movie with Grace Hopper? A: An actor named",
                {"first_actor": "Grace Hopper"}, "Marie Curie"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """P, T, R and H saved as folders (sweep donors are paths), plus the examples file."""
    root = tmp_path_factory.mktemp("hybrid-sweep")
    P, T, R, tok = models("llama")
    for name, model in (("P", P), ("T", T), ("R", R), ("H", build_hybrid(T, R))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    save_examples_jsonl(EXAMPLES, root / "examples.jsonl")
    return root


def _config(root: Path, out: str, **model) -> SweepConfig:
    pair = {"name": "tiny", "recipient": "P", "donor": "T", "donors": {"hybrid": "H", "relation": "R"}, **model}
    return SweepConfig.model_validate({"models": [pair], "data": {"examples": "examples.jsonl"}, "grid": "hybrid",
                                       "batch_size": 8, "output": out, "base_dir": str(root)})


def test_sweep_with_two_named_donors(saved):
    outcome = run_sweep(_config(saved, "out"), show_progress=False)
    rows = load_results(outcome.results)
    assert len(rows) == len(PAPER_GRIDS["hybrid"]) * len(EXAMPLES)
    manifest = load_manifest(outcome.results)
    ident = manifest["models"]["tiny"]
    assert ident["donor"]["source"] == str(saved / "T")
    assert {k: v["source"] for k, v in ident["donors"].items()} == {"hybrid": str(saved / "H"),
                                                                    "relation": str(saved / "R")}
    prints = {ident["donor"]["weights_fingerprint"], *(v["weights_fingerprint"] for v in ident["donors"].values())}
    assert len(prints) == 3
    check = manifest["baseline_check"]["tiny"]
    assert check["ok"] is True and check["donor:hybrid"]["spec"] == "hybrid_model"
    assert check["donor:relation"]["spec"] == "relation_model"
    # the rows are the numbers a Grafter with the same donors gives
    P, T, R, tok = models("llama")
    g = Grafter(P, T, tok, donors={"hybrid": build_hybrid(T, R), "relation": R})
    by = {(r["spec"], r["example"]): r for r in rows}
    for name in ("attn_o_ffn_fe_o_ffn", "attn_o_ffn_no_fe_relation_lt"):
        res = g.run(paper_specs()[name], [e.prompt for e in EXAMPLES], [e.spans for e in EXAMPLES])
        probs = torch.softmax(res.logits.float(), -1)
        for j, ex in enumerate(EXAMPLES):
            row = by[(name, ex.key)]
            assert row["prob"] == pytest.approx(float(probs[j, row["target_id"]]), abs=1e-6)
    # a rerun resumes; a changed hybrid is refused
    assert run_sweep(_config(saved, "out"), show_progress=False).stats["tiny"].written == 0
    manifest_file = Path(outcome.manifest)
    data = json.loads(manifest_file.read_text())
    data["models"]["tiny"]["donors"]["hybrid"]["weights_fingerprint"] = "0" * 16
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="donor 'hybrid' weights_fingerprint"):
        run_sweep(_config(saved, "out"), show_progress=False)


def test_sweep_refuses_a_missing_named_donor_before_loading(saved):
    config = _config(saved, "missing", donors={"hybrid": "H"})
    with pytest.raises(SweepConfigError, match=r"spec 'attn_o_ffn_no_fe_relation_lt' grafts from donor\(s\) "
                                               r"\['relation'\], but model 'tiny' has donors \['hybrid'\]"):
        run_sweep(config, show_progress=False)
    assert not (saved / "missing").exists()
    with pytest.raises(Exception, match="donor name 'default'"):
        _config(saved, "x", donors={"default": "H"})


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def _recipe():
    return load_recipe("hybrid")


def test_recipe_dry_run_and_errors(tmp_path, capsys):
    recipe = _recipe()
    assert recipe.main(["--tiny", "--n", "6", "--dry-run", "--eval-split", "both", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "split B: 13 specs × 12 examples = 156 rows" in err and "split A: 13 specs × 12 examples" in err
    assert "o+up+down" in err and "3 / 3 facts" in err
    assert not (tmp_path / "out").exists()
    assert recipe.main(["--model", "P", "--donor", "F", "--dry-run"]) == 1
    assert "takes --task and --relation instead of --donor" in capsys.readouterr().err
    assert recipe.main(["--model", "P", "--task", "T", "-o", str(tmp_path / "o2")]) == 1
    assert "give --model, --task and --relation" in capsys.readouterr().err


def test_recipe_writes_splits(tmp_path, capsys):
    from nngraft.study.data import load_facts, read_manifest, save_facts

    facts = make_facts("fake_movies_real_actors", 7, seed=0)
    save_facts(facts, tmp_path / "fmra.jsonl", dataset="fake_movies_real_actors", seed=0)
    assert _recipe().main(["--facts", str(tmp_path / "fmra.jsonl"), "--split-seed", "3",
                           "--write-splits", str(tmp_path / "s")]) == 0
    a, b = load_facts(tmp_path / "s" / "fmra_A.jsonl"), load_facts(tmp_path / "s" / "fmra_B.jsonl")
    assert ([f.id for f in a], [f.id for f in b]) == tuple([f.id for f in x] for x in split_facts(facts, 3))
    # the source dataset travels with the splits, so `nngraft data texts` picks its training templates
    assert read_manifest(tmp_path / "s" / "fmra_B.jsonl")["dataset"] == "fake_movies_real_actors"
    assert "split A (seed 3): 4 facts" in capsys.readouterr().err


def test_recipe_runs_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "out"
    assert _recipe().main(["--tiny", "--n", "2", "--template", "sentence_3", "--no-plot", "--no-progress",
                           "-o", str(out)]) == 0
    rows = load_results(out / "eval_B")
    assert len(rows) == len(PAPER_GRIDS["hybrid"])  # 1 fact in split B × 1 template
    b_ids = {f.id for f in split_facts(make_facts("fake_movies_real_actors", 2, seed=0), 0)[1]}
    assert {r["fact_id"] for r in rows} == b_ids
    manifest = load_manifest(out / "eval_B")
    assert manifest["baseline_check"]["tiny-llama"]["ok"] is True
    [hybrid_dir] = (out / "models").glob("hybrid-*")
    assert manifest["models"]["tiny-llama"]["donors"]["hybrid"]["source"] == str(hybrid_dir)
    assert "recovery is relative to P and R" in capsys.readouterr().err
