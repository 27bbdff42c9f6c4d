"""Spans → tokens with character offsets, on BPE (GPT-2/NeoX style) and SentencePiece-style
tokenizers; padding; position errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Index, PositionError, Span, SpanAlignmentWarning, SpanNotFoundError
from nngraft.testing import tiny_pair, tiny_tokenizer
from nngraft.compile.tokens import pad_left, tokenize_prompt, tokenize_prompts

PROMPT = "Q: Who stars in a movie with Grace Hopper? A: An actor named"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_span_tokens_cover_exactly_the_entity(style):
    tok = tiny_tokenizer(style)
    p = tokenize_prompt(tok, PROMPT, {"first_actor": "Grace Hopper", "q": "Who"})
    pieces = tok.convert_ids_to_tokens(list(p.ids))
    text = "".join(pieces[i] for i in p.spans["first_actor"]).replace("Ġ", " ").replace("▁", " ")
    assert text.strip() == "Grace Hopper"
    # contiguous, and nothing of the entity outside it (a lone-space token before it is not selected)
    first, last = p.spans["first_actor"][0], p.spans["first_actor"][-1]
    assert list(p.spans["first_actor"]) == list(range(first, last + 1))
    assert "with" in "".join(pieces[:first]) and "Gr" not in "".join(pieces[:first])
    assert "".join(pieces[last + 1:]).lstrip("Ġ▁").startswith("?")


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_span_as_character_range_and_first_occurrence(style):
    tok = tiny_tokenizer(style)
    text = "Ada met Ada"
    first = tokenize_prompt(tok, text, {"x": "Ada"}).spans["x"]
    by_range = tokenize_prompt(tok, text, {"x": (8, 11)}).spans["x"]
    assert first[0] <= 1 and by_range[0] > first[-1]


def test_span_cutting_through_a_token_warns_and_names_tokens():
    tok = tiny_tokenizer("llama")  # whole words are single pieces in this tokenizer
    with pytest.warns(SpanAlignmentWarning, match=r"span 'who' = 'Gra' cuts through a token; selected whole tokens \d+:'.*Grace'"):
        p = tokenize_prompt(tok, PROMPT, {"who": "Gra"})
    assert len(p.spans["who"]) == 1


def test_span_errors():
    tok = tiny_tokenizer("gpt2")
    with pytest.raises(SpanNotFoundError, match=r"prompt 1: span 'first_actor' = 'Zendaya' does not occur in the prompt"):
        tokenize_prompts(tok, ["Ada stars", "Grace stars"], [{"first_actor": "Ada"}, {"first_actor": "Zendaya"}])
    with pytest.raises(SpanNotFoundError, match="outside the prompt"):
        tokenize_prompt(tok, "Ada", {"x": (1, 9)})
    with pytest.raises(PositionError, match="empty"):
        tokenize_prompts(tok, [])
    with pytest.raises(PositionError, match="2 prompts but 1 span"):
        tokenize_prompts(tok, ["a", "b"], [{}])
    with pytest.raises(PositionError, match="prompt 0 is empty"):
        tokenize_prompt(tok, "")


def test_span_name_missing_for_a_prompt():
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor")])])
    with pytest.raises(PositionError, match=r"prompt 1: the spec grafts at span 'first_actor', but no text was given for it \(spans given: movie\)"):
        g.run(spec, ["Ada stars in", "Bob stars in"], spans=[{"first_actor": "Ada"}, {"movie": "stars"}])


def test_index_out_of_range_for_short_prompt():
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Index(index=[40])])])
    with pytest.raises(PositionError, match=r"position index 40 is out of range for a prompt of \d+ tokens"):
        g.run(spec, ["Ada stars in"])


def test_pad_left_keeps_positions():
    batch = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.pad == (0, 2)
