"""nngraft.compile.plan: selectors → positions, specs → cells of the left-padded batch in forward order,
and the plan's re-indexings (last columns, LM head on the last column, remapping to a new
layout) and prefix analysis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Index, Last, Span
from nngraft.arch import adapter_for_model_type
from nngraft.compile.plan import (
    GraftPlan,
    ModuleGraft,
    compile_plan,
    first_grafted_position,
    prefix_signature,
    rule_targets,
    select_positions,
)
from nngraft.spec import All, Not, Other
from nngraft.testing import tiny_tokenizer
from nngraft.compile.tokens import TokenizedPrompt, tokenize_prompt

LLAMA = adapter_for_model_type("llama")
CONFIG = SimpleNamespace(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
A = TokenizedPrompt("a b c d", (5, 6, 7, 8), {"x": (1, 2)})
B = TokenizedPrompt("e f", (9, 10), {"x": (0,)})


def cells(graft: ModuleGraft) -> list[tuple[int, int]]:
    return list(zip(graft.rows.tolist(), graft.cols.tolist()))


def test_compile_places_each_rows_cells_in_the_left_padded_batch_in_forward_order():
    spec_a = GraftSpec(name="a", rules=[GraftRule(components=["o", "up"], layers="last:1", positions=[Span(span="x")])])
    spec_b = GraftSpec(name="b", rules=[GraftRule(components=["o"], layers="last:1", positions=[Last()])])
    plan = compile_plan([spec_a, spec_b], LLAMA, CONFIG, [A, B])
    assert (plan.batch_size, plan.seq_len) == (2, 4)
    assert [m.path for m in plan.modules] == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
    o, up = plan.modules
    assert cells(o) == [(0, 1), (0, 2), (1, 3)]  # row 1 is padded by 2: its last token is column 3
    assert cells(up) == [(0, 1), (0, 2)]
    assert "2 module grafts over 2×4" in plan.summary()


def test_a_whole_mlp_at_the_same_cells_is_one_module_unless_asked_otherwise():
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])])
    assert [m.path for m in compile_plan([spec], LLAMA, CONFIG, [A]).modules] == ["model.layers.1.mlp"]
    split = compile_plan([spec], LLAMA, CONFIG, [A], collapse_mlp=False)
    assert [m.path for m in split.modules] == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_fused_qkv_grafts_carry_their_output_features():
    gpt2 = adapter_for_model_type("gpt2")
    spec = GraftSpec(rules=[GraftRule(components=["k"], layers="first:1", positions=[Last()])])
    [graft] = compile_plan([spec], gpt2, CONFIG, [A]).modules
    assert graft.path == "transformer.h.0.attn.c_attn" and graft.features.tolist() == list(range(32, 64))


def test_last_columns_keeps_and_reindexes_the_last_k_columns():
    spec = GraftSpec(rules=[GraftRule(components=["o"], layers="first:1", positions=[All()])])
    plan = compile_plan([spec], LLAMA, CONFIG, [A])
    last2 = plan.last_columns(2)
    assert last2.seq_len == 2 and cells(last2.modules[0]) == [(0, 0), (0, 1)]


def test_lm_head_on_last_column_reindexes_only_the_head():
    spec = GraftSpec(rules=[GraftRule(components=["lm_head", "o"], layers="first:1", positions=[Index(index=[1, 3])])])
    plan = compile_plan([spec], LLAMA, CONFIG, [A])
    moved = plan.lm_head_on_last_column("lm_head")
    by_path = {m.path: cells(m) for m in moved.modules}
    assert by_path["model.layers.0.self_attn.o_proj"] == [(0, 1), (0, 3)]  # unchanged
    assert by_path["lm_head"] == [(0, 0)]  # only column 3 survives, as column 0 of 1
    assert moved.seq_len == plan.seq_len
    untouched = compile_plan([GraftSpec(rules=[GraftRule(components=["o"], positions=[Last()])])], LLAMA, CONFIG, [A])
    assert untouched.lm_head_on_last_column("lm_head") is untouched


def test_remap_moves_cells_to_a_new_layout():
    spec = GraftSpec(rules=[GraftRule(components=["o"], layers="first:1", positions=[All()])])
    plan = compile_plan([spec, spec], LLAMA, CONFIG, [A, B])
    # keep positions >= 1, in a 3-column layout where row r's position t sits at column t - 1
    moved = plan.remap(lambda rows, t: t >= 1, [4, 2], 3, [-1, -1])
    assert moved.seq_len == 3 and cells(moved.modules[0]) == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_first_grafted_position_and_prefix_signature():
    lt = GraftSpec(rules=[GraftRule(components=["o"], positions=[Last()])])
    fe_lt_mlp = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="x")]),
                                 GraftRule(components=["mlp"], positions=[Last()])])
    fe_lt_o = GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="x")]),
                               GraftRule(components=["o"], positions=[Last()])])
    assert first_grafted_position(lt, A) == 3 and first_grafted_position(fe_lt_mlp, A) == 1
    assert first_grafted_position(GraftSpec(), A) is None
    # what is grafted before the last token: the same for both FE+LT variants, nothing for LT
    assert prefix_signature(fe_lt_mlp, A) == prefix_signature(fe_lt_o, A) != prefix_signature(lt, A) == ()


def test_rule_targets_expand_groups_and_layers():
    spec = GraftSpec(rules=[GraftRule(components=["mlp", "lm_head"], layers="last:1", positions=[Last()])])
    assert rule_targets(spec, LLAMA, 2) == [[("lm_head", None), ("gate", 1), ("up", 1), ("down", 1)]]


def test_one_spec_per_row_is_required():
    with pytest.raises(ValueError, match="compile_plan got 1 specs for 2 prompts"):
        compile_plan([GraftSpec()], LLAMA, CONFIG, [A, B])


def test_an_empty_plan_is_empty():
    plan = compile_plan([GraftSpec(), GraftSpec()], LLAMA, CONFIG, [A, B])
    assert plan.is_empty and plan.modules == [] and plan.by_path() == []
    assert GraftPlan([], 1, 1).is_empty
    assert plan.seq_len == 4


def test_selectors_on_a_prompt():
    tok = tiny_tokenizer("llama")
    p = tokenize_prompt(tok, "Ada Lovelace stars in", {"a": "Ada Lovelace"})
    n = len(p)
    assert select_positions(Last(), p) == {n - 1}
    assert select_positions(All(), p) == set(range(n))
    assert select_positions(Index(index=[0, -1]), p) == {0, n - 1}
    assert select_positions(Not(**{"not": [Span(span="a"), Last()]}), p) == set(range(n)) - set(p.spans["a"]) - {n - 1}
    assert select_positions(Other(), p, other=frozenset({2})) == {2}
    # generation: the sequence grew by one token, and 'last' / -1 name the new one
    assert select_positions(Last(), p, length=n + 1) == {n}
    assert select_positions(Index(index=[-1]), p, length=n + 1) == {n}
