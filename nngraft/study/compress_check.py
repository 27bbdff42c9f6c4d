"""What compressing a full finetune into a LoRA adapter costs on the study's own metric.

:func:`recovery_cost` grafts F (dense, exact) and each compressed adapter into P with the same spec
(the demo's FE+LT by default) on the same test prompts, and reports the mean target probability
and the recovery ``(G − P) / (F − P)`` of each, next to F itself and P + the whole adapter: the
number a user needs before choosing a rank or an energy (``nngraft donor compress --demo-out``).

Example:
    >>> row = {"donor": "F (dense)", "target_prob": 0.5}
    >>> recovery(row["target_prob"], p=0.1, f=0.9)
    0.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def recovery(g: float, *, p: float, f: float) -> float:
    """``(G − P) / (F − P)`` of mean target probability (NaN when F ≈ P)."""
    return (g - p) / (f - p) if abs(f - p) > 1e-12 else float("nan")


def recovery_cost(P: Any, F: Any, tokenizer: Any, adapters: Mapping[str, str | Path], facts: Sequence[Any],
                  template: str, *, spec: str = "fe_lt", batch_size: int = 32) -> list[dict[str, Any]]:
    """Rows (one per donor: F dense, then each adapter) with the mean target probability of the
    ``spec`` graft and of the donor alone (spec ``f``: every weight everywhere), and their
    recoveries. ``adapters``: label → adapter folder (from :func:`nngraft.donors.compress.compress_donor`)."""
    from ..donors.delta import LoraDonor
    from ..grafter import Grafter
    from ..spec import GraftSpec
    from .grids import paper_specs
    from .templates import make_test_examples

    examples = make_test_examples(facts, template)
    prompts, spans, answers = [e.prompt for e in examples], [e.spans for e in examples], [e.answer for e in examples]
    specs = paper_specs()
    grafted, alone = specs[spec], specs["f"]

    def mean_prob(grafter: Any, which: Any) -> float:
        return float(grafter.run(which, prompts, spans).target_prob(answers).mean())

    p = mean_prob(Grafter(P, F, tokenizer, batch_size=batch_size), GraftSpec())
    donors: dict[str, Any] = {"F (dense, exact)": F, **{label: LoraDonor(folder) for label, folder in adapters.items()}}
    rows = []
    f = None
    for label, donor in donors.items():
        g = Grafter(P, donor, tokenizer, batch_size=batch_size)
        whole, graft = mean_prob(g, alone), mean_prob(g, grafted)
        f = whole if f is None else f
        rows.append({"donor": label, "alone_prob": whole, "graft_prob": graft, "p_prob": p,
                     "alone_recovery": recovery(whole, p=p, f=f), "graft_recovery": recovery(graft, p=p, f=f)})
    return rows
