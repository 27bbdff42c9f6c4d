"""docs/nnsight.md runs as written: its python blocks are extracted and run in order, in one
namespace (as a reader pasting them into one session would)."""

from __future__ import annotations

import linecache
import re
from pathlib import Path
from tests.helpers import ROOT

DOC = ROOT / "docs" / "nnsight.md"


def test_nnsight_doc_examples_run_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6, "docs/nnsight.md lost its examples"
    namespace: dict = {"__name__": "nnsight_doc"}
    for number, block in enumerate(blocks, 1):
        name = f"<docs/nnsight.md block {number}>"
        linecache.cache[name] = (len(block), None, block.splitlines(keepends=True), name)  # nnsight reads it
        code = compile(block, name, "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own code
    # what the blocks computed is what they say
    import torch

    g, spec, prompts, spans = (namespace[k] for k in ("g", "spec", "prompts", "spans"))
    expected = g.run(spec, prompts, spans).logits
    assert torch.allclose(namespace["out"], expected, atol=1e-5)
    assert not torch.allclose(namespace["logits"][:, -1], expected, atol=1e-3)  # the user zeroed an MLP output
    assert not torch.allclose(namespace["h_remote"], namespace["h"], atol=1e-4)  # h had the user's edit
    with g.trace(spec, prompts, spans=spans):
        clean = g.model_envoy.model.layers[1].output.save()
    torch.testing.assert_close(namespace["h_remote"], clean, atol=2e-5, rtol=1e-4)
    lens = namespace["lens"]
    assert len(lens) == g.n_layers and torch.allclose(lens[-1], expected.softmax(-1), atol=1e-5)
