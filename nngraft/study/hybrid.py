"""The paper's hybrid experiment (docs/paper.md#experiment-grid): the fact split, the
hybrid model, and the graft specs.

**Models.** The facts (e.g. FMRA) are split in two halves, A and B (:func:`split_facts`). The
*task* model T is P finetuned on A; the *relation* model R is P finetuned on B. Both learned the
same task (the movie/co-star sentences) but different facts. The *hybrid* H
(:func:`build_hybrid`) is a copy of T whose attention output projection ``o`` and MLP ``up`` /
``down`` projections in the second half of the layers (``n//2 … n-1``) are R's. The MLP gate
projection is **not** replaced, as in the paper (``components=("o", "gate", "up", "down")``
replaces it too); q, k, v, layer norms, embeddings and head stay T's.

**Reading** (ours; the paper's configs and split code are not public, see docs/reproduce.md):
the test facts are split B's — facts R knows and T does not. At the last token (LT), H gives
recall with T's attention, which never saw these facts (task-specific), and R's late O/FFN, which
did (entity-specific extraction). At the first-actor tokens (FE), T's weights are grafted — T has
the task but not the B facts — in the amount each config names:

=======================  =========================  ==========================================
spec                     FE (from T, all layers)     LT (all layers)
=======================  =========================  ==========================================
``attn_o_ffn_no_fe``     nothing (P)                q, k, v, o, mlp from H
``attn_o_ffn_full_fe``   every block component       q, k, v, o, mlp from H
``attn_o_ffn_fe_attn``   q, k, v                     q, k, v, o, mlp from H
``attn_o_ffn_fe_ffn``    mlp (gate, up, down)        q, k, v, o, mlp from H
``attn_o_ffn_fe_o_ffn``  o, mlp                      q, k, v, o, mlp from H
=======================  =========================  ==========================================

Every other position runs P's weights. Controls: the same FE with LT from T
(``…_task_lt``: T's own recall, which never saw B) or from R (``…_relation_lt``: R's recall
including its attention), and the baselines ``p`` (P), ``f`` (T everywhere), ``relation_model``
(R everywhere) and ``hybrid_model`` (H everywhere). The rules' ``donor`` names ``"hybrid"`` and
``"relation"`` must be given to the Grafter: ``Grafter(P, T, tok, donors={"hybrid": H,
"relation": R})``.

Example:
    >>> from nngraft.testing import perturbed_copy, tiny_model
    >>> T = tiny_model("llama", n_layers=4)
    >>> R = perturbed_copy(T, seed=2)
    >>> H = build_hybrid(T, R)
    >>> sorted(hybrid_parameters(T))[:2]
    ['model.layers.2.mlp.down_proj.weight', 'model.layers.2.mlp.up_proj.weight']
    >>> bool((H.model.layers[3].mlp.up_proj.weight == R.model.layers[3].mlp.up_proj.weight).all())
    True
    >>> [s.name for s in hybrid_specs()][:2]
    ['attn_o_ffn_no_fe', 'attn_o_ffn_full_fe']
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch import adapter_for, get_module, output_axis
from ..errors import GraftError, SpecError
from .errors import DataError
from ..spec import GraftRule, GraftSpec, Last, LayerSelection, Span, resolve_layers
from .examples import Fact
from ..donors.loading import default_permissions

HYBRID = "hybrid"
"""Donor name of the hybrid model H in the specs' rules."""
RELATION = "relation"
"""Donor name of the relation model R (controls and the ``relation_model`` baseline)."""

DEFAULT_LAYERS: LayerSelection = "second_half"
DEFAULT_COMPONENTS: tuple[str, ...] = ("o", "up", "down")
WITH_GATE: tuple[str, ...] = ("o", "gate", "up", "down")

LT_COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
"""The paper's ``attn_o_ffn`` bucket at the last token: attn = q, k, v; o; ffn = the MLP."""

FE_VARIANTS: dict[str, tuple[str, ...]] = {
    "no_fe": (),
    "full_fe": ("all",),
    "fe_attn": ("q", "k", "v"),
    "fe_ffn": ("mlp",),
    "fe_o_ffn": ("o", "mlp"),
}
"""What is grafted from the task model at the first-actor tokens, by config suffix."""

CONTROL_VARIANTS: tuple[str, ...] = ("no_fe", "full_fe")
"""FE variants that also get ``…_task_lt`` / ``…_relation_lt`` controls."""

_LT = Last()
HYBRID_FORMAT = "nngraft.hybrid"
HYBRID_VERSION = 1
HYBRID_FILE = "hybrid.json"


# ---------------------------------------------------------------------------------------------
# The fact split
# ---------------------------------------------------------------------------------------------


def split_facts(facts: Sequence[Fact], seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """Split facts into halves A (the task model's training facts) and B (the relation model's).

    Deterministic: the fact ids are sorted, shuffled with ``random.Random(seed)``, and the first
    ⌈n/2⌉ go to A, the rest to B. The result depends only on the set of ids and the seed (not on
    the input order); each half keeps the input order. The paper's split code is not public, so
    this is nngraft's own rule: use the same seed for finetuning and evaluation.

    Example:
        >>> facts = [Fact(str(i), {"first_actor": f"Actor {i}"}) for i in range(6)]
        >>> a, b = split_facts(facts, seed=0)
        >>> [f.id for f in a], [f.id for f in b]
        (['1', '2', '4'], ['0', '3', '5'])
    """
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"fact id {dup!r} occurs twice; split_facts needs unique ids")
    if len(facts) < 2:
        raise DataError(f"split_facts needs at least 2 facts to make two halves, got {len(facts)}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    in_a = set(order[: (len(order) + 1) // 2])
    return [f for f in facts if f.id in in_a], [f for f in facts if f.id not in in_a]


def shared_entities(a: Sequence[Fact], b: Sequence[Fact],
                    fields: Sequence[str] = ("first_actor", "second_actor")) -> list[str]:
    """Names that occur (in any of ``fields``) in both splits. An actor in both A and B lets the
    task model know something about B's entities, which blurs the experiment; FMRA uses every
    actor once, so its splits share none.

    Example:
        >>> shared_entities([Fact("1", {"first_actor": "Ada"})], [Fact("2", {"second_actor": "Ada"})])
        ['Ada']
    """
    def names(facts: Sequence[Fact]) -> set[str]:
        return {str(f.fields[k]) for f in facts for k in fields if k in f.fields}

    return sorted(names(a) & names(b))


# ---------------------------------------------------------------------------------------------
# The hybrid model
# ---------------------------------------------------------------------------------------------


def _normalized(layers: LayerSelection, components: Sequence[str]) -> GraftRule:
    """Validate ``layers`` / ``components`` with the spec format's own rules and messages."""
    from pydantic import ValidationError

    from ..spec import format_validation_error

    try:
        return GraftRule(components=list(components), layers=layers, positions=[_LT])
    except ValidationError as error:
        raise SpecError(format_validation_error(error, "hybrid selection").replace(
            "invalid graft spec", "invalid")) from None


def hybrid_parameters(model: torch.nn.Module, layers: LayerSelection = DEFAULT_LAYERS,
                      components: Sequence[str] = DEFAULT_COMPONENTS) -> dict[str, tuple]:
    """The parameter entries :func:`build_hybrid` takes from the relation model: ``{full
    parameter name: index}``, where ``()`` is the whole tensor and otherwise an index selecting the
    q/k/v features of a fused QKV projection (GPT-2 ``c_attn``, NeoX ``query_key_value``).

    Components may be names or groups (``mlp``, ``attn``); they are looked up in the adapter
    table, so this works on every supported architecture. Components a model lacks are errors
    (e.g. ``gate`` on GPT-2); global components (embeddings, head) are not in a layer and refused.
    """
    rule = _normalized(layers, components)
    adapter = adapter_for(model)
    block, globals_ = adapter.expand(list(rule.components), rule="hybrid components")
    if globals_:
        raise SpecError(f"hybrid components {globals_} are not in a layer; build_hybrid replaces "
                        "block components only (o, up, down, gate, q, k, v, ...)")
    n = adapter.n_layers(model.config)
    chosen: dict[str, set[int] | None] = {}  # module path -> output features (None = all)
    for layer in resolve_layers(rule.layers, n):
        for component in block:
            for site in adapter.sites(component, layer, model.config):
                have = chosen.get(site.path, set())
                if site.features is None or have is None:
                    chosen[site.path] = None
                else:
                    chosen[site.path] = have | set(site.features)
    out: dict[str, tuple] = {}
    for path, features in chosen.items():
        module = get_module(model, path)
        for name, param in module.named_parameters():
            full = f"{path}.{name}"
            out_axis = output_axis(module, name, param)
            if features is None or len(features) == param.shape[out_axis]:
                out[full] = ()
            else:
                feats = torch.tensor(sorted(features))
                out[full] = (slice(None), feats) if out_axis == 1 else (feats,)
    return out


def build_hybrid(task_model: torch.nn.Module, relation_model: torch.nn.Module,
                 layers: LayerSelection = DEFAULT_LAYERS,
                 components: Sequence[str] = DEFAULT_COMPONENTS) -> torch.nn.Module:
    """A new model: a deep copy of ``task_model`` with ``relation_model``'s weights for
    ``components`` in ``layers`` (default: o, up, down in the second half — the paper's hybrid;
    pass :data:`WITH_GATE` to replace the gate projection too). Neither input is modified; the
    result shares no tensor with them. Both models must be the same architecture and size.

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> T, R, _ = tiny_pair("gpt2", n_layers=2)
        >>> H = build_hybrid(T, R, layers=[1], components=["down"])
        >>> bool((H.transformer.h[1].mlp.c_proj.bias == R.transformer.h[1].mlp.c_proj.bias).all())
        True
        >>> bool((H.transformer.h[0].mlp.c_proj.bias == T.transformer.h[0].mlp.c_proj.bias).all())
        True
    """
    from ..donors.donor import ModelDonor

    ModelDonor(relation_model).check_against(task_model)  # same type, same parameter shapes
    entries = hybrid_parameters(task_model, layers, components)
    hybrid = copy.deepcopy(task_model)
    mine = dict(hybrid.named_parameters())
    theirs = dict(relation_model.named_parameters())
    with torch.no_grad():
        for name, index in entries.items():
            source = theirs[name].detach().to(device=mine[name].device, dtype=mine[name].dtype)
            mine[name].data[index] = source[index]
    return hybrid.eval()


# ---------------------------------------------------------------------------------------------
# Building and caching on disk (for sweeps, whose donors are paths)
# ---------------------------------------------------------------------------------------------


def _listable(index: tuple) -> Any:
    return "all" if index == () else {"features": [int(i) for i in index[-1].tolist()],
                                      "axis": len(index) - 1}


def hybrid_record(task_model: torch.nn.Module, relation_model: torch.nn.Module, *, task_source: str,
                  relation_source: str, layers: LayerSelection = DEFAULT_LAYERS,
                  components: Sequence[str] = DEFAULT_COMPONENTS) -> dict[str, Any]:
    """What identifies a hybrid: both inputs (source and full weight sha256), the selection, the
    resolved layers and every replaced parameter. ``record["key"]`` hashes all of it."""
    from ..donors.loading import weights_fingerprint

    rule = _normalized(layers, components)
    adapter = adapter_for(task_model)
    entries = hybrid_parameters(task_model, rule.layers, rule.components)
    selection = rule.layers if not hasattr(rule.layers, "model_dump") else rule.layers.model_dump()
    record = {
        "format": HYBRID_FORMAT, "version": HYBRID_VERSION,
        "task": {"source": task_source, "weights_sha256": weights_fingerprint(task_model)},
        "relation": {"source": relation_source, "weights_sha256": weights_fingerprint(relation_model)},
        "layers": selection,
        "resolved_layers": resolve_layers(rule.layers, adapter.n_layers(task_model.config)),
        "components": list(rule.components),
        "gate_replaced": "gate" in adapter.expand(list(rule.components))[0],
        "replaced_parameters": {name: _listable(index) for name, index in entries.items()},
    }
    blob = json.dumps({k: v for k, v in record.items() if k != "task" and k != "relation"}
                      | {"task": record["task"]["weights_sha256"],
                         "relation": record["relation"]["weights_sha256"]}, sort_keys=True)
    record["key"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return record


def read_hybrid_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``hybrid.json`` of a saved hybrid, or ``None`` if the folder holds none."""
    path = Path(folder) / HYBRID_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise GraftError(f"{path} is not valid JSON ({error}); delete the folder to rebuild the hybrid") from None
    if not isinstance(record, dict) or record.get("format") != HYBRID_FORMAT:
        raise GraftError(f"{path} is not an nngraft hybrid record")
    return record


def save_hybrid(hybrid: torch.nn.Module, tokenizer: Any, record: dict[str, Any], folder: str | Path) -> Path:
    """Save the hybrid (safetensors), the tokenizer and ``hybrid.json`` atomically: into a
    temporary sibling folder, renamed into place when complete."""
    from ..util.io import atomic_write_text

    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        default_permissions(tmp)  # mkdtemp's 0700 → what the umask gives
        hybrid.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / HYBRID_FILE, json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_hybrid(task: str | Path, relation: str | Path, out_dir: str | Path, *,
                   layers: LayerSelection = DEFAULT_LAYERS, components: Sequence[str] = DEFAULT_COMPONENTS,
                   dtype: str = "float32", console: Any = None) -> tuple[Path, dict[str, Any], bool]:
    """Load the task and relation models from ``task`` / ``relation`` (local folders or hub ids),
    build the hybrid and save it to ``out_dir/hybrid-KEY`` (KEY: :func:`hybrid_record`'s key),
    or reuse an identical one already there. Returns ``(folder, record, was_cached)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, "auto")
    say = console.print if console is not None else (lambda *_: None)
    say(f"hybrid: loading task model {task} and relation model {relation} …")
    try:
        T = AutoModelForCausalLM.from_pretrained(str(task), dtype=torch_dtype).eval()
        R = AutoModelForCausalLM.from_pretrained(str(relation), dtype=torch_dtype).eval()
        tok = AutoTokenizer.from_pretrained(str(task))
    except OSError as error:
        raise GraftError(f"cannot load the task/relation models: {error}") from None
    record = hybrid_record(T, R, task_source=str(task), relation_source=str(relation),
                           layers=layers, components=components)
    folder = Path(out_dir) / f"hybrid-{record['key']}"
    old = read_hybrid_record(folder)
    if old is not None and old.get("key") == record["key"]:
        say(f"hybrid: reusing {folder}")
        return folder, old, True
    H = build_hybrid(T, R, layers, components)
    from ..donors.loading import weights_fingerprint

    record["weights_sha256"] = weights_fingerprint(H)
    save_hybrid(H, tok, record, folder)
    say(f"hybrid: built {folder} ({len(record['replaced_parameters'])} tensors from the relation model, "
        f"layers {record['resolved_layers']})")
    return folder, record, False


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


def _rule(components: Sequence[str], position: Any, donor: str | None = None) -> GraftRule:
    return GraftRule(components=list(components), layers="all", positions=[position], donor=donor)


def hybrid_specs(entity: str = "first_actor") -> list[GraftSpec]:
    """The hybrid experiment's specs (see the module docstring): 5 configs, 4 controls, 2 baselines.
    ``entity``: the span name of FE (the facts' entity field)."""
    _FE = Span(span=entity)
    lt_label = "q, k, v, o, mlp (all layers)"
    fe_label = {"no_fe": "nothing at FE", "full_fe": "the task model's block weights at FE",
                "fe_attn": "the task model's q, k, v at FE", "fe_ffn": "the task model's MLP at FE",
                "fe_o_ffn": "the task model's o + MLP at FE"}
    specs = []
    for variant, fe in FE_VARIANTS.items():
        fe_rules = [_rule(fe, _FE)] if fe else []
        specs.append(GraftSpec(
            name=f"attn_o_ffn_{variant}",
            description=f"hybrid experiment: {fe_label[variant]} (all layers); the hybrid's {lt_label} "
            "at the last token",
            rules=[*fe_rules, _rule(LT_COMPONENTS, _LT, HYBRID)]))
    for variant in CONTROL_VARIANTS:
        fe = FE_VARIANTS[variant]
        fe_rules = [_rule(fe, _FE)] if fe else []
        for who, donor in (("task", None), ("relation", RELATION)):
            specs.append(GraftSpec(
                name=f"attn_o_ffn_{variant}_{who}_lt",
                description=f"hybrid experiment control: {fe_label[variant]}; the {who} model's "
                f"{lt_label} at the last token",
                rules=[*fe_rules, _rule(LT_COMPONENTS, _LT, donor)]))
    for donor in (RELATION, HYBRID):
        specs.append(GraftSpec(
            name=f"{donor}_model", description=f"hybrid experiment baseline: every weight of the {donor} "
            f"model at every position (equals running it)",
            rules=[GraftRule(components=["everything"], positions=[{"all": True}], donor=donor)]))
    return specs


HYBRID_SPEC_NAMES: tuple[str, ...] = tuple(s.name for s in hybrid_specs())
"""Names of :func:`hybrid_specs`, in grid order."""


def spec_donors(specs: Sequence[GraftSpec]) -> set[str]:
    """Named donors the specs' rules use (beyond the main donor F).

    Example:
        >>> sorted(spec_donors(hybrid_specs()))
        ['hybrid', 'relation']
    """
    return {r.donor for s in specs for r in s.rules if r.donor not in (None, "default")}
