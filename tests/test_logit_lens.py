"""recipes/logit_lens.py: the --tiny run writes its JSON and plot; its numbers equal a logit lens
computed directly from P's plain forward (hidden_states) and, after the last layer, the grafted
model's own output."""

from __future__ import annotations

import json

import torch

from nngraft import Grafter
from nngraft.result import target_token_id
from nngraft.study.data import make_facts, make_test_examples
from nngraft.study.grids import paper_specs
from nngraft.testing import tiny_pair

from tests.helpers.recipe_loader import load_recipe


def test_tiny_run_writes_json_and_plot(tmp_path, capsys):
    recipe = load_recipe("logit_lens")
    assert recipe.main(["--tiny", "--facts", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "logit_lens.json").read_text())
    assert list(record["variants"]) == ["P", "F", "FE", "LT", "FE+LT"] and record["facts"] == 3
    for curves in record["variants"].values():
        assert all(len(curves[k]) == 2 for k in ("prob", "logprob", "top1", "top10"))  # 2 layers
    assert (tmp_path / "logit_lens.png").stat().st_size > 5000 and (tmp_path / "logit_lens.svg").exists()
    assert "FE+LT: p(answer) after the last layer" in capsys.readouterr().out


def test_lens_equals_direct_computation():
    recipe = load_recipe("logit_lens")
    P, F, tok = tiny_pair("gpt2")
    g = Grafter(P, F, tok)
    examples = make_test_examples(make_facts("fake_movies_fake_actors", 3, seed=1), "sentence_3")
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    targets = [target_token_id(tok, e.prompt, e.answer) for e in examples]
    specs = paper_specs()
    lens = recipe.last_token_lens(g, specs["p"], prompts, spans, targets, batch_size=2)
    # P: each layer's hidden state from a plain forward of each prompt alone, through ln_f + lm_head
    per_layer = []
    for prompt, target in zip(prompts, targets):
        with torch.no_grad():
            states = P(torch.tensor([tok(prompt)["input_ids"]]), output_hidden_states=True).hidden_states
            # hidden_states[-1] already has GPT-2's final norm applied; the lens applies it itself
            blocks = [P.transformer.h[i] for i in range(len(states) - 1)]
            assert len(blocks) == 2
            probs = [torch.softmax(P.lm_head(P.transformer.ln_f(s[0, -1])), -1)[target] for s in states[1:-1]]
            probs.append(torch.softmax(P.lm_head(states[-1][0, -1]), -1)[target])
        per_layer.append(torch.stack(probs))
    expected = torch.stack(per_layer).mean(0)
    torch.testing.assert_close(torch.tensor(lens["prob"]), expected, atol=1e-6, rtol=1e-4)
    # block-only grafts: after the last layer, the lens is the grafted model's own next-token prob
    for name in ("fe", "lt", "fe_lt"):
        got = recipe.last_token_lens(g, specs[name], prompts, spans, targets)["prob"][-1]
        run = g.run(specs[name], prompts, spans).probs.gather(1, torch.tensor(targets)[:, None]).mean()
        assert abs(got - float(run)) < 1e-6, name
