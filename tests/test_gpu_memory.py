"""benchmarks/gpu_memory.py: the bytes it reports for P and the grafted part of F equal a count
by hand on a tiny Llama shape; the docs' table is what the script prints."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_memory import account, table
from tests.helpers import ROOT

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=384, tie_word_embeddings=True)


def test_weight_bytes_match_a_hand_count():
    h, m, layers, vocab, kv_width = 32, 64, 2, 384, 2 * 8
    mlp = 3 * h * m                                    # gate, up (h→m) and down (m→h)
    attention = h * h + 2 * h * kv_width + h * h       # q, k, v (2 key/value heads of 8), o
    norms = 2 * h                                      # input and post-attention RMSNorm weights
    block = mlp + attention + norms
    everything = layers * block + vocab * h + h        # + embedding (tied with lm_head: once) + final norm
    bf16 = 2
    got = account("tiny", TINY, batch=2, tokens=4)
    assert got["params"] == everything
    rows = got["specs"]
    assert rows["LT MLPs"]["F_bytes"] == layers * mlp * bf16
    assert rows["FE+LT"]["F_bytes"] == layers * block * bf16
    assert rows["everything"]["F_bytes"] == everything * bf16
    for row in rows.values():
        assert row["P_bytes"] == everything * bf16
        assert row["peak_bytes"] == row["P_bytes"] + row["F_bytes"] + row["activation_bytes"]
        assert row["activation_bytes"] > 0 and row["fits_80GB"]


def test_docs_hold_the_table_the_script_prints():
    text, results = table()
    doc = (ROOT / "docs" / "gpu.md").read_text()
    assert text in doc, "docs/gpu.md's memory table is stale: paste `python -m benchmarks.gpu_memory`"
    by_name = {r["model"]: r for r in results}
    assert all(row["fits_80GB"] for row in by_name["Llama-3-8B"]["specs"].values())
    assert not any(row["fits_80GB"] for row in by_name["Llama-3-70B"]["specs"].values())
