#!/usr/bin/env python
"""Each difference between nngraft's standard specs and the paper's published code, measured on
its own (docs/paper.md, "Paper-exact variants"):

- the main grid's position specs as nngraft runs them; with F's embeddings at every fully grafted
  position (``+embed``); also without ``down`` in the complements (``+embed-down``); and fully
  paper-exact, with F's LM head at the last token where the embeddings are grafted there on a
  tied-embedding model (``_paper``);
- F's blocks at FE plus F's MLP or attention (q, k, v, o) at LT in one quarter of the layers, with
  nngraft's even quarters and with the paper's (``_paperq``: q = n // 4, remainder in the fourth).

    python recipes/paper_exact.py --tiny
    python recipes/paper_exact.py --model P --donor F --facts FACTS.jsonl --template sentence_3
"""

import sys
import tempfile
from pathlib import Path

from _common import execute, parser

BASES = ["fe", "lt", "fe_lt", "fe_lt_complement", "not_fe", "not_lt"]
QUARTERS = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]


def comparison_specs() -> list:
    """The specs of the comparison (see the module docstring), in order."""
    from nngraft.spec import GraftRule, GraftSpec, Last, Span
    from nngraft.study.grids import paper_exact, paper_specs

    paper = paper_specs()
    out, seen = [], set()
    for base in BASES:
        spec = paper[base]
        variants = [spec,
                    paper_exact(spec, layer_groups=False, no_down=False, tied=False).model_copy(
                        update={"name": f"{base}+embed"}),
                    paper_exact(spec, layer_groups=False, tied=False).model_copy(update={"name": f"{base}+embed-down"}),
                    paper_exact(spec)]
        for v in variants:
            if v.content_hash() not in seen:
                seen.add(v.content_hash())
                out.append(v)
    for label, components in (("mlp", ["mlp"]), ("attn_o", ["q", "k", "v", "o"])):
        for quarter in QUARTERS:
            spec = GraftSpec(name=f"fe+lt_{label}_{quarter}", description=f"F's blocks at FE, F's {label} at LT in "
                             f"the {quarter.replace('_', ' ')}", rules=[
                                 GraftRule(components=["all"], positions=[Span(span="first_actor")]),
                                 GraftRule(components=components, layers=quarter, positions=[Last()])])
            out += [spec, spec.model_copy(update={"name": spec.name + "_paperq", "layer_groups": "paper",
                                                  "schema_version": "2"})]
    return out


def main(argv=None) -> int:
    args = parser(__doc__, tiny_layers=6).parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:  # the results' manifest records every spec's JSON
        files = [str(s.save(Path(folder) / f"{s.name.replace('+', '_')}.json")) for s in comparison_specs()]
        return execute(args, "paper_exact", grid=None, templates=["sentence_3"], specs=files)


if __name__ == "__main__":
    sys.exit(main())
