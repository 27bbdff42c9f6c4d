"""The paper's graft specs and the named grids that group them (docs/paper.md#experiment-grid).

Every spec here is plain data; :func:`write_paper_specs` writes them as the JSON files shipped in
``recipes/specs/`` (a test checks the files and this module agree). Conventions:

- Positions: **FE** = the entity span (``first_actor`` by default), **M** = the title span
  (``movie_title``), **R** = the relation span (``relation``: the template's relation word, e.g.
  "stars"), **LT** = the last token. Span names are the test template's ``{fields}``; every
  function here takes ``entity=``, ``title=`` and ``relation=`` to name other fields, so a user's
  facts with any field names run every grid (``paper_specs(entity="drug")``; on the command line
  ``--entity drug``).
- The position grids (FE, LT, FE+LT, complements, M…, R…) graft ``all`` block components (layer
  norms, attention q/k/v/o, MLP) at **all layers**. They do not graft the embeddings, the final
  norm or the LM head, as in the paper's main sweep (``patch_lm_head = never``); the
  ``lm_head`` grid adds F's LM head at the last token.
- Baselines: ``p`` has no rules (plain P). ``f`` grafts ``everything`` (every block component,
  embeddings, final norm, LM head) at every position, which is exactly running F.
- Component buckets at LT use the paper's names: "attn" = q, k, v only; "o" = the attention
  output projection; "ffn" = the MLP (gate/up/down; up/down where there is no gate).
- Layer groups use nngraft's even split (quarters nest in eighths; the paper's eighths were
  broken, see docs/paper.md, quirk 7), so the layer-group specs need a model with at least 8 layers.

Example:
    >>> specs = paper_specs()
    >>> [specs[n].name for n in PAPER_GRIDS["main"]]
    ['p', 'f', 'fe', 'lt', 'fe_lt', 'fe_lt_complement', 'not_fe', 'not_lt']
    >>> paper_specs(entity="drug")["fe_lt"].rules[0].positions[0].span
    'drug'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from ..spec import All, GraftRule, GraftSpec, Last, Not, Span
from .hybrid import HYBRID_SPEC_NAMES, hybrid_specs

LmHeadMode = Literal["never", "last_token", "always"]

LT = Last()
SPAN_ROLES: dict[str, str] = {"entity": "first_actor", "title": "movie_title", "relation": "relation"}
"""The paper's named spans by role, with their default (movie) field names: FE = ``entity``,
M = ``title``, R = ``relation``."""
ROLE_LABELS: dict[str, str] = {"entity": "FE", "title": "M", "relation": "R"}


def span_roles(entity: str | None = None, title: str | None = None, relation: str | None = None) -> dict[str, str]:
    """The span name of each role (``entity``, ``title``, ``relation``), defaults filled in; a
    name that is not a template field name is a :class:`~nngraft.errors.SpecError`.

    Example:
        >>> span_roles(entity="drug")
        {'entity': 'drug', 'title': 'movie_title', 'relation': 'relation'}
    """
    from ..errors import SpecError

    given = {"entity": entity, "title": title, "relation": relation}
    roles = {role: given[role] if given[role] is not None else default for role, default in SPAN_ROLES.items()}
    for role, name in roles.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SpecError(f"{role} span {name!r}: give the name of a template field, e.g. 'drug' for "
                            "'{drug} is made by' (letters, digits and _)")
    names = list(roles.values())
    if len(set(names)) != len(names):
        raise SpecError(f"the entity, title and relation spans must be different fields, got {roles}")
    return roles


def span_labels(roles: dict[str, str] | None = None) -> dict[str, str]:
    """Span name → the paper's label (FE, M, R) for these roles.

    Example:
        >>> span_labels(span_roles(entity="drug"))["drug"]
        'FE'
    """
    roles = roles or dict(SPAN_ROLES)
    return {roles[role]: label for role, label in ROLE_LABELS.items()}

BUCKETS: dict[str, list[str]] = {
    "attn": ["q", "k", "v"],
    "o": ["o"],
    "ffn": ["mlp"],
    "attn_o": ["q", "k", "v", "o"],
    "o_ffn": ["o", "mlp"],
    "attn_ffn": ["q", "k", "v", "mlp"],
    "attn_o_ffn": ["q", "k", "v", "o", "mlp"],
    "ffn_up": ["up"],
    "ffn_down": ["down"],
    "o_ffn_up": ["o", "up"],
    "o_ffn_down": ["o", "down"],
}
"""Component buckets at the last token, by the paper's names (``patch_configs_lt``)."""

LAYER_COMPONENTS_FOR_GROUPS: dict[str, list[str]] = {
    "all": ["all"], "attn": ["q", "k", "v"], "o": ["o"], "ffn": ["mlp"],
}
QUARTERS = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]
EIGHTHS = ["first_eighth", "second_eighth", "third_eighth", "fourth_eighth",
           "fifth_eighth", "sixth_eighth", "seventh_eighth", "eighth_eighth"]


def _spec(name: str, description: str, *rules: GraftRule) -> GraftSpec:
    return GraftSpec(name=name, description=description, rules=list(rules))


def _at(*positions, components=("all",), layers="all") -> GraftRule:
    return GraftRule(components=list(components), layers=layers, positions=list(positions))


def _position_specs(roles: dict[str, str]) -> list[GraftSpec]:
    FE, M, R = (Span(span=roles[r]) for r in ("entity", "title", "relation"))
    labels = span_labels(roles)
    named = _roles_note(roles)
    specs = []
    combos = {
        "fe": [FE], "lt": [LT], "fe_lt": [FE, LT],
        "m": [M], "m_lt": [M, LT], "fe_m": [FE, M], "fe_m_lt": [FE, M, LT],
        "r": [R], "r_lt": [R, LT], "fe_r": [FE, R], "fe_r_lt": [FE, R, LT],
    }
    for name, positions in combos.items():
        label = "+".join(labels.get(getattr(p, "span", ""), "LT") for p in positions)
        specs.append(_spec(name, f"F's block weights (all layers) at {label} only{named}", _at(*positions)))
    complements = {
        "fe_lt_complement": [FE, LT], "not_fe": [FE], "not_lt": [LT],
        "not_fe_m": [FE, M], "not_fe_m_lt": [FE, M, LT],
    }
    for name, positions in complements.items():
        label = "+".join(labels.get(getattr(p, "span", ""), "LT") for p in positions)
        specs.append(_spec(name, f"F's block weights (all layers) everywhere except {label}{named}",
                           _at(Not(**{"not": positions}))))
    return specs


def _roles_note(roles: dict[str, str]) -> str:
    """`` (FE = the 'drug' span)`` for the roles that are not the paper's default fields."""
    changed = [f"{ROLE_LABELS[r]} = the {name!r} span" for r, name in roles.items() if name != SPAN_ROLES[r]]
    return f" ({', '.join(changed)})" if changed else ""


def paper_specs(entity: str | None = None, *, title: str | None = None,
                relation: str | None = None) -> dict[str, GraftSpec]:
    """Every spec of the paper's grids, by name (see the module docstring for conventions).

    ``entity``, ``title``, ``relation``: the span names of FE, M and R (default ``first_actor``,
    ``movie_title``, ``relation``), e.g. ``paper_specs(entity="drug")`` for facts whose entity
    field is ``drug``. The spec names stay the paper's (``fe``, ``fe_lt``, …)."""
    roles = span_roles(entity, title, relation)
    FE = Span(span=roles["entity"])
    named = _roles_note(roles)
    specs = [
        _spec("p", "baseline P: no graft (the pretrained model)"),
        _spec("f", "baseline F: every weight of F at every position (equals running F)",
              _at(All(), components=("everything",))),
        *_position_specs(roles),
    ]
    for bucket, components in BUCKETS.items():
        specs.append(_spec(f"lt_{bucket}", f"F's {'+'.join(components)} (all layers) at the last token",
                           _at(LT, components=components)))
    for label, components in LAYER_COMPONENTS_FOR_GROUPS.items():
        for group in QUARTERS + EIGHTHS:
            specs.append(_spec(f"lt_{label}_{group}",
                               f"F's {'+'.join(components)} in the {group.replace('_', ' ')} of the "
                               "layers, at the last token",
                               _at(LT, components=components, layers=group)))
    specs += [
        _spec("fe_lt_selective", "selective layers: F's block weights at FE in all layers and at LT "
              f"in the second half (third + fourth quarters){named}",
              _at(FE), _at(LT, layers="second_half")),
        _spec("fe_lt_selective_v1", "earlier selective variant: FE in the first three quarters, LT "
              f"in the second half{named}", _at(FE, layers="first_quarter"), _at(FE, layers="second_quarter"),
              _at(FE, layers="third_quarter"), _at(LT, layers="second_half")),
        _spec("fe_o_ffn_lt_selective", "selective layers with the FE component override: o + FFN "
              f"(no q/k/v) at FE in all layers, all block weights at LT in the second half{named}",
              _at(FE, components=("o", "mlp")), _at(LT, layers="second_half")),
        _spec("lm_head_only", "only F's LM head, at the last token", _at(LT, components=("lm_head",))),
    ]
    for base in PAPER_GRIDS["main"][2:]:
        spec = with_lm_head(next(s for s in specs if s.name == base), "last_token")
        specs.append(spec)
    specs += hybrid_specs(entity=roles["entity"])  # rules with donor "hybrid" / "relation" (see nngraft.study.hybrid)
    return {s.name: s for s in specs}


def with_lm_head(spec: GraftSpec, mode: LmHeadMode) -> GraftSpec:
    """``spec`` with F's LM head added: ``never`` (unchanged), ``last_token`` (the LM head at the
    last position; the working version of the paper's no-op option, named ``NAME+lm_head``) or
    ``always`` (at every position, ``NAME+lm_head_all``; it gives the same next-token logits as
    ``last_token``, since only the last position's logits are read).

    Example:
        >>> with_lm_head(GraftSpec(name="fe"), "last_token").name
        'fe+lm_head'
    """
    if mode == "never":
        return spec
    if mode not in ("last_token", "always"):
        raise ValueError(f"unknown lm_head mode {mode!r}; use 'never', 'last_token' or 'always'")
    where = LT if mode == "last_token" else All()
    suffix = "+lm_head" if mode == "last_token" else "+lm_head_all"
    extra = "at the last token" if mode == "last_token" else "at every position"
    description = (spec.description or spec.name) + f"; plus F's LM head {extra}"
    return spec.model_copy(update={"name": spec.name + suffix, "description": description,
                                   "rules": [*spec.rules, _at(where, components=("lm_head",))]})


_BUCKET_NAMES = [f"lt_{b}" for b in BUCKETS]
PAPER_GRIDS: dict[str, list[str]] = {
    "main": ["p", "f", "fe", "lt", "fe_lt", "fe_lt_complement", "not_fe", "not_lt"],
    "movie": ["p", "f", "fe", "lt", "fe_lt", "m", "m_lt", "fe_m", "fe_m_lt", "not_fe_m", "not_fe_m_lt"],
    "relation": ["p", "f", "fe", "lt", "fe_lt", "r", "fe_r", "r_lt", "fe_r_lt"],
    "components": ["p", "f", "lt", *_BUCKET_NAMES],
    "layers": ["p", "f", "lt", *[f"lt_{c}_{g}" for c in LAYER_COMPONENTS_FOR_GROUPS for g in QUARTERS + EIGHTHS]],
    "lm_head": ["p", "f", "lm_head_only", "fe", "fe+lm_head", "lt", "lt+lm_head", "fe_lt", "fe_lt+lm_head",
                "fe_lt_complement", "fe_lt_complement+lm_head", "not_fe", "not_fe+lm_head",
                "not_lt", "not_lt+lm_head"],
    "selective": ["p", "f", "fe", "lt", "fe_lt", "fe_lt_selective", "fe_lt_selective_v1",
                  "fe_o_ffn_lt_selective"],
    "hybrid": ["p", "f", *HYBRID_SPEC_NAMES],
}
"""Named grids of :func:`paper_specs` names. ``main``, ``components``, ``layers``, ``lm_head`` and
``selective`` run on any template with a first actor; ``movie`` needs ``{movie_title}`` in the
template (sentence_3/4), ``relation`` needs ``{relation}`` (sentence_1/2). ``hybrid`` needs the
named donors ``hybrid`` and ``relation`` (:mod:`nngraft.study.hybrid`)."""


PAPER_EXACT_SUFFIX = "_paper"
"""Name suffix of :func:`paper_exact_specs`' variants (``fe_lt_paper``) and of the grids made of
them (``main_paper``)."""
_COMPLEMENT_COMPONENTS = ["ln_attn", "attn", "ln_mlp", "mlp_in"]
"""Every block component but ``down`` (the paper's ``other`` rule), in groups that expand to what
each architecture has (``mlp_in`` = gate + up; GPT-2 has no gate)."""
PAPER_MISSING_EIGHTHS = ("third_eighth", "seventh_eighth", "eighth_eighth")
"""Eighths the paper's code could not run: its third eighth is empty (that config grafted nothing)
and it had no seventh or eighth; the paper-exact grids leave them out."""


def _covers_last(positions: list) -> bool:
    """Whether a rule's positions include the last token (``last``, ``all``, or a complement
    that does not leave it out)."""
    for p in positions:
        if isinstance(p, (Last, All)):
            return True
        if isinstance(p, Not) and not any(isinstance(q, Last) for q in p.not_):
            return True
    return False


def paper_exact(spec: GraftSpec, *, tied: bool = True, layer_groups: bool = True, embeddings: bool = True,
                no_down: bool = True) -> GraftSpec:
    """``spec`` as the paper's published code ran it (docs/paper.md, "Paper-exact variants"):

    - ``layer_groups: "paper"`` (q = n // 4, the fourth quarter takes the remainder; its eighths);
    - a rule grafting every block component at positions also grafts the **embeddings** there (its
      printed configs set ``embeddings: True`` on every full-position patch, the ``other`` rule too);
    - a complement rule (``{"not": [...]}``, the paper's ``other``) leaves **down** out (its
      ``other`` rule has ``mlp_down: False``);
    - with ``tied`` embeddings (Gemma, Llama-3.2-1B, GPT-2, SmolLM2: the LM head *is* the
      embedding matrix), grafting the embeddings at the last token swaps the **LM head** there too.

    Component buckets (some components at LT) and the baselines are unchanged but for the layer
    groups. Named ``NAME_paper``. ``layer_groups``, ``embeddings``, ``no_down`` and ``tied`` switch
    each difference off (False) to measure it alone (the LM head follows the embeddings).

    Example:
        >>> s = paper_exact(paper_specs()["not_fe"])
        >>> s.name, s.layer_groups, s.rules[0].components
        ('not_fe_paper', 'paper', ['embed', 'ln_attn', 'attn', 'ln_mlp', 'mlp_in'])
        >>> [r.components for r in s.rules[1:]]
        [['lm_head']]
    """
    if not spec.rules or spec.content_hash() == paper_specs()["f"].content_hash():
        return spec
    rules, head = [], False
    for rule in spec.rules:
        full = list(rule.components) == ["all"] and rule.donor is None and rule.weights is None
        components = list(rule.components)
        if full and no_down and any(isinstance(p, Not) for p in rule.positions):
            components = list(_COMPLEMENT_COMPONENTS)
        if full and embeddings:
            components = ["embed", *components]
        rule = rule.model_copy(update={"components": components})
        rules.append(rule)
        head = head or ("embed" in rule.components and _covers_last(list(rule.positions)))
    if tied and head and not any(list(r.components) == ["lm_head"] for r in rules):
        rules.append(_at(LT, components=("lm_head",)))
    changes = ["the paper's layer groups"] if layer_groups else []
    if any("embed" in r.components for r in rules):
        changes.append("the embeddings at every fully grafted position")
    if any("mlp_in" in r.components for r in rules):
        changes.append("no down projection in the complement")
    if tied and head:
        changes.append("F's LM head at LT (tied embeddings)")
    update: dict = {"name": spec.name + PAPER_EXACT_SUFFIX, "rules": rules,
                    "description": f"{spec.description or spec.name}; paper-exact: {', '.join(changes)}"}
    if layer_groups:
        update.update(layer_groups="paper", schema_version="2")
    return spec.model_copy(update=update)


def paper_exact_specs(entity: str | None = None, *, title: str | None = None, relation: str | None = None,
                      tied: bool = True) -> dict[str, GraftSpec]:
    """:func:`paper_exact` of every spec of the grids ``main``, ``movie``, ``relation``,
    ``components``, ``layers``, ``lm_head`` and ``selective`` (the hybrid grid is left out), by
    name (``fe_lt_paper``, …); ``p`` and ``f`` are the baselines themselves. ``tied=False`` for
    models whose LM head is not the embedding matrix (Pythia).

    Example:
        >>> specs = paper_exact_specs(entity="drug")
        >>> specs["fe_lt_paper"].rules[0].components, specs["fe_lt_paper"].rules[-1].components
        (['embed', 'all'], ['lm_head'])
        >>> "lt_attn_third_eighth_paper" in specs  # empty in the paper's code; 7th and 8th did not exist
        False
    """
    base = paper_specs(entity, title=title, relation=relation)
    names = [n for n in dict.fromkeys(n for grid, members in PAPER_GRIDS.items() if grid != "hybrid" for n in members)
             if not n.endswith(PAPER_MISSING_EIGHTHS)]
    out = {}
    for name in names:
        spec = paper_exact(base[name], tied=tied)
        out[spec.name] = spec
    return out


def grid_specs(name: str, entity: str | None = None, *, title: str | None = None,
               relation: str | None = None) -> list[GraftSpec]:
    """The specs of a named paper grid, in order; ``entity``, ``title``, ``relation`` name the
    spans as in :func:`paper_specs`.

    Example:
        >>> [s.name for s in grid_specs("relation")][-1]
        'fe_r_lt'
        >>> grid_specs("main", entity="inventor")[2].rule_names_span()
        {'inventor'}
    """
    exact = name.endswith(PAPER_EXACT_SUFFIX) and name[: -len(PAPER_EXACT_SUFFIX)] in PAPER_GRIDS
    base_name = name[: -len(PAPER_EXACT_SUFFIX)] if exact else name
    if base_name not in PAPER_GRIDS or (exact and base_name == "hybrid"):
        from ..errors import SpecError

        raise SpecError(f"unknown grid {name!r}; the paper's grids are: {', '.join(PAPER_GRIDS)}, and their "
                        f"paper-exact variants {', '.join(g + PAPER_EXACT_SUFFIX for g in PAPER_GRIDS if g != 'hybrid')}")
    specs = paper_specs(entity, title=title, relation=relation)
    if exact:
        return [paper_exact(specs[n]) for n in PAPER_GRIDS[base_name] if not n.endswith(PAPER_MISSING_EIGHTHS)]
    return [specs[n] for n in PAPER_GRIDS[base_name]]


def spec_file_name(name: str) -> str:
    """Where :func:`write_paper_specs` puts a spec, relative to the specs folder."""
    if name.startswith("lt_") and any(name.endswith(g) for g in QUARTERS + EIGHTHS):
        return f"layers/{name}.json"
    if name in HYBRID_SPEC_NAMES:
        return f"hybrid/{name}.json"
    if "+lm_head" in name:
        return f"lm_head/{name.replace('+', '_')}.json"
    return f"{name}.json"


def write_paper_specs(folder: str | Path) -> list[Path]:
    """Write every paper spec as pretty JSON under ``folder`` (``recipes/specs``)."""
    folder = Path(folder)
    return [spec.save(folder / spec_file_name(name)) for name, spec in paper_specs().items()]
