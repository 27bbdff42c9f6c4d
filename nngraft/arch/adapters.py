"""Architecture adapters: where each component lives in a Hugging Face model.

All architecture knowledge of nngraft is in the :data:`ADAPTERS` table below. An
:class:`Adapter` says, for one ``model_type``:

- where the blocks are (``layers_path``, e.g. ``model.layers``);
- for each component, which module produces it, listed **in forward order** inside a block
  (nnsight requires modules to be touched in the order the forward pass calls them);
- for fused projections (GPT-2 ``c_attn``, NeoX ``query_key_value``), which output features
  belong to ``q``, ``k`` and ``v``;
- for modules that see tokens on another axis than 1, which axis (``token_axes``).

Facts about module *classes* that hold across architectures live in the table of module kinds
(:mod:`nngraft.arch.kinds`: GPT-2's ``Conv1D`` keeps its weight as (in, out), transposed from
``nn.Linear``, …); the names under which checkpoints store weights live here
(:func:`checkpoint_prefixes`, :data:`CHECKPOINT_RENAMES`, :func:`tied_alternatives`).

A component may live in several modules (Gemma-2 has a norm before *and* after attention; both
are ``ln_attn``). Norms without weights (OLMo-1) are simply absent: there is nothing to graft.

Add an architecture without editing nngraft::

    from nngraft.arch import Adapter, register_adapter
    register_adapter(Adapter(
        model_type="my_llama",
        layers_path="model.layers",
        block=(("ln_attn", "input_layernorm"), ("q", "self_attn.q_proj"), ...),
        embed="model.embed_tokens", ln_final="model.norm", lm_head="lm_head",
    ))

and check it covers every weight with ``adapter.uncovered_parameters(model)``.

:data:`ADAPTERS` maps each ``model_type`` (and alias) to its adapter:
    >>> from nngraft import ADAPTERS
    >>> ADAPTERS["mistral"] is ADAPTERS["llama"], ADAPTERS["gpt2"].layers_path
    (True, 'transformer.h')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import ComponentNotFoundError, UnsupportedArchitectureError
from .kinds import stores_weight_in_out
from ..spec import COMPONENT_GROUPS, GLOBAL_COMPONENTS, LAYER_COMPONENTS

FusedLayout = Literal["concat", "per_head"]
"""How a fused QKV projection lays out its outputs: ``concat`` is ``[Q | K | V]`` (GPT-2);
``per_head`` is ``[Q_h | K_h | V_h]`` for each head ``h`` in turn (GPT-NeoX / Pythia)."""


@dataclass(frozen=True)
class Site:
    """One module whose output carries (part of) a component.

    ``features`` is ``None`` when the whole output belongs to the component, or the indices of
    the output's last dimension that do (fused QKV). ``token_axis`` is the dimension of the module's
    input and output that indexes tokens (1 for ``(batch, tokens, ...)``; Gemma-3 normalizes
    queries and keys as ``(batch, heads, tokens, head_dim)``, axis 2)."""

    component: str
    path: str
    layer: int | None
    features: tuple[int, ...] | None = None
    token_axis: int = 1


@dataclass(frozen=True)
class Adapter:
    """Component → module map for one Hugging Face ``model_type``. See the module docstring.

    Example:
        >>> from nngraft import Adapter
        >>> from nngraft.testing import tiny_pair
        >>> mine = Adapter(model_type="my_llama", layers_path="model.layers", block=(
        ...     ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
        ...     ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
        ...     ("down", "mlp.down_proj")), embed="model.embed_tokens", ln_final="model.norm")
        >>> mine.uncovered_parameters(tiny_pair("llama")[0])  # no ln_attn / ln_mlp in its block
        ['model.layers.0.input_layernorm.weight', 'model.layers.0.post_attention_layernorm.weight',
         'model.layers.1.input_layernorm.weight', 'model.layers.1.post_attention_layernorm.weight']
    """

    model_type: str
    layers_path: str
    block: tuple[tuple[str, str], ...]
    embed: str | None = None
    pos_embed: str | None = None
    ln_final: str | None = None
    lm_head: str | None = "lm_head"
    fused_qkv: FusedLayout | None = None
    mlp_path: str | None = "mlp"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())
    token_axes: tuple[tuple[str, int], ...] = ()

    # -- what the architecture has ------------------------------------------------------------

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this architecture has, global ones first."""
        found = [c for c in GLOBAL_COMPONENTS if getattr(self, c)]
        found += [c for c in LAYER_COMPONENTS if any(name == c for name, _ in self.block)]
        return tuple(found)

    def expand(self, names: list[str], *, rule: str = "") -> tuple[list[str], list[str]]:
        """Expand component names and groups into (block components, global components).

        Groups keep the members this architecture has; a single component it lacks is an error.
        """
        have = set(self.components)
        out: list[str] = []
        for name in names:
            if name in COMPONENT_GROUPS:
                out += [c for c in COMPONENT_GROUPS[name] if c in have]
            elif name in have:
                out.append(name)
            else:
                where = f"{rule}: " if rule else ""
                raise ComponentNotFoundError(
                    f"{where}component {name!r} does not exist in {self.model_type!r} models "
                    f"(they have: {', '.join(self.components)}). "
                    + _ABSENT_HINTS.get((self.model_type, name), _ABSENT_HINTS.get(name, ""))
                )
        seen = dict.fromkeys(out)
        return ([c for c in LAYER_COMPONENTS if c in seen],
                [c for c in GLOBAL_COMPONENTS if c in seen])

    def n_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def head_dim(self, config: Any) -> int:
        """Features per attention head of q, k, v (and of o's input)."""
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    # -- where components live --------------------------------------------------------------

    def sites(self, component: str, layer: int | None, config: Any) -> list[Site]:
        """The module sites of ``component`` (at ``layer`` for block components)."""
        if component in GLOBAL_COMPONENTS:
            return [Site(component, getattr(self, component), None)]
        result = []
        for name, rel in self.block:
            if name == component:
                features = None
                if self.fused_qkv and name in ("q", "k", "v"):
                    features = fused_features(self.fused_qkv, name, config)
                axis = dict(self.token_axes).get(rel, 1)
                result.append(Site(component, f"{self.layers_path}.{layer}.{rel}", layer, features, axis))
        return result

    def fused_with(self, component: str) -> tuple[str, ...]:
        """The components that share ``component``'s module in a fused projection (``("q", "k",
        "v")`` for GPT-2's ``c_attn``), or ``()`` when it has a module of its own. Only the
        adapter knows which projections are fused; the compiler, partial donors and payloads ask
        here.

        Example:
            >>> ADAPTERS["gpt2"].fused_with("k"), ADAPTERS["llama"].fused_with("k")
            (('q', 'k', 'v'), ())
        """
        return ("q", "k", "v") if self.fused_qkv and component in ("q", "k", "v") else ()

    def block_order(self) -> dict[str, int]:
        """Rank of each relative module path in a block's forward order."""
        order: dict[str, int] = {}
        for _, rel in self.block:
            order.setdefault(rel, len(order))
        return order

    def site_order(self, site: Site, n_layers: int) -> tuple[int, int]:
        """A sort key that puts sites in the order the forward pass reaches them."""
        if site.layer is None:
            early = site.component in ("embed", "pos_embed")
            rank = GLOBAL_COMPONENTS.index(site.component)
            return (-1, rank) if early else (n_layers, rank)
        rel = site.path[len(f"{self.layers_path}.{site.layer}."):]
        return (site.layer, self.block_order()[rel])

    # -- checking a model against the adapter ----------------------------------------------

    def uncovered_parameters(self, model: torch.nn.Module) -> list[str]:
        """Names of parameters no component reaches (empty for a complete adapter)."""
        config = model.config
        covered: set[str] = set()
        n = self.n_layers(config)
        comps = [c for c in self.components]
        for component in comps:
            layers = [None] if component in GLOBAL_COMPONENTS else range(n)
            for layer in layers:
                for site in self.sites(component, layer, config):
                    module = get_module(model, site.path)
                    covered.update(f"{site.path}.{p}" for p, _ in module.named_parameters())
        seen_ids = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in covered}
        return [name for name, p in model.named_parameters() if id(p) not in seen_ids]

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`UnsupportedArchitectureError` if a module path is missing in ``model``."""
        paths = [getattr(self, c) for c in GLOBAL_COMPONENTS if getattr(self, c)]
        paths += [f"{self.layers_path}.0.{rel}" for _, rel in self.block]
        for path in paths:
            try:
                get_module(model, path)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"the {self.model_type!r} adapter expects a module at {path!r}, but "
                    f"{type(model).__name__} has none. The installed transformers may lay this "
                    "architecture out differently; register a corrected Adapter "
                    "(see nngraft.arch)."
                ) from None


_ABSENT_HINTS = {
    "gate": "Its MLP has no gate projection; graft 'up' and 'down' (or 'mlp').",
    "pos_embed": "It uses rotary position embeddings, which have no weights.",
    "q_norm": "Only some architectures (Qwen3, Gemma-3, OLMo-2) normalize queries and keys.",
    "k_norm": "Only some architectures (Qwen3, Gemma-3, OLMo-2) normalize queries and keys.",
    ("olmo", "ln_attn"): "OLMo-1's layer norms have no weights.",
    ("olmo", "ln_mlp"): "OLMo-1's layer norms have no weights.",
    ("olmo", "ln_final"): "OLMo-1's layer norms have no weights.",
    ("olmo2", "ln_attn"): "",
}


def fused_features(layout: FusedLayout, component: str, config: Any) -> tuple[int, ...]:
    """Output features of a fused QKV projection that belong to ``component`` (q, k or v).

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=4, num_attention_heads=2)
        >>> fused_features("per_head", "k", cfg)   # [q0 q0 k0 k0 v0 v0 | q1 q1 k1 k1 v1 v1]
        (2, 3, 8, 9)
    """
    hidden = int(config.hidden_size)
    which = "qkv".index(component)
    if layout == "concat":
        return tuple(range(which * hidden, (which + 1) * hidden))
    heads = int(config.num_attention_heads)
    head_dim = hidden // heads
    return tuple(h * 3 * head_dim + which * head_dim + i for h in range(heads) for i in range(head_dim))


def output_axis(module: torch.nn.Module, name: str, param: torch.Tensor) -> int:
    """The axis of ``module``'s parameter ``name`` that indexes its output features."""
    return 1 if name.rpartition(".")[2] == "weight" and param.ndim == 2 and stores_weight_in_out(module) else 0


def checkpoint_prefixes() -> tuple[str, ...]:
    """The top-level module names (``model.``, ``transformer.``, ``gpt_neox.``) a checkpoint may
    leave off its tensor names, from every registered adapter."""
    heads = [a.layers_path.split(".")[0] + "." for a in ADAPTERS.values()]
    return tuple(dict.fromkeys(h for h in heads if h.count(".") == 1))


CHECKPOINT_RENAMES: dict[str, tuple[str, ...]] = {"lm_head.weight": ("embed_out.weight",)}
"""Other names a checkpoint may store a parameter under (GPT-NeoX / Pythia checkpoints keep the
LM head as ``embed_out``)."""


COMPUTATION_CONFIG_KEYS: tuple[str, ...] = (
    "model_type",
    # sizes
    "num_hidden_layers", "hidden_size", "intermediate_size", "n_inner", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    # functions and constants that change every number without changing a shape
    "hidden_act", "hidden_activation", "activation_function", "rms_norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
    "rotary_pct", "rotary_emb_base", "rope_local_base_freq", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "use_parallel_residual", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "sliding_window_pattern", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "clip_qkv",
    "qk_layernorm", "attention_multiplier", "embedding_multiplier", "logits_scaling", "residual_multiplier",
)
"""Config entries that change what a model computes (shapes, activations, norm epsilons, rotary
settings, tied embeddings, attention variants), in any architecture's spelling (transformers maps
GPT-2's ``n_layer`` etc. onto these names). A donor must share every one with its recipient:
"everything" grafted is F only when F's config computes as P's does. Dropout rates, token ids,
dtypes and names are not here (they do not change an eval-mode forward pass)."""


def tied_alternatives(name: str) -> tuple[str, ...]:
    """Where a checkpoint with tied embeddings keeps the LM head's weight ``name`` (only the input
    embedding is stored): every registered adapter's ``embed`` weight, for an ``lm_head`` weight."""
    if not any(a.lm_head and name == f"{a.lm_head}.weight" for a in ADAPTERS.values()):
        return ()
    return tuple(dict.fromkeys(f"{a.embed}.weight" for a in ADAPTERS.values() if a.embed))


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``get_module(model, "model.layers.3.mlp")``; raises AttributeError on a bad path."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_ATTN = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"))
_O = (("o", "self_attn.o_proj"),)
_GLU = (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))
_LLAMA_BLOCK = (("ln_attn", "input_layernorm"), *_ATTN, *_O, ("ln_mlp", "post_attention_layernorm"), *_GLU)
_LLAMA_GLOBALS = dict(embed="model.embed_tokens", ln_final="model.norm", lm_head="lm_head")
_GEMMA2_BLOCK = (
    ("ln_attn", "input_layernorm"), *_ATTN, *_O, ("ln_attn", "post_attention_layernorm"),
    ("ln_mlp", "pre_feedforward_layernorm"), *_GLU, ("ln_mlp", "post_feedforward_layernorm"),
)

ADAPTERS: dict[str, Adapter] = {}
"""model_type → Adapter. Extend it with :func:`register_adapter`."""


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> Adapter:
    """Make ``adapter`` (and its aliases) available for its ``model_type``.

    Example:
        >>> from dataclasses import replace
        >>> from nngraft import ADAPTERS, register_adapter
        >>> register_adapter(replace(ADAPTERS["llama"], model_type="my_llama", aliases=())).model_type
        'my_llama'
        >>> ADAPTERS["my_llama"].layers_path
        'model.layers'
        >>> del ADAPTERS["my_llama"]  # (leave the table as it was)
    """
    for key in (adapter.model_type, *adapter.aliases):
        if key in ADAPTERS and not overwrite and ADAPTERS[key] is not adapter:
            raise ValueError(f"an adapter for {key!r} exists; pass overwrite=True to replace it")
        ADAPTERS[key] = adapter
    return adapter


for _adapter in (
    Adapter("llama", "model.layers", _LLAMA_BLOCK, **_LLAMA_GLOBALS,
            notes="Llama 2/3, SmolLM2", aliases=("mistral", "qwen2", "gemma")),
    Adapter("qwen3", "model.layers", (
        ("ln_attn", "input_layernorm"), ("q", "self_attn.q_proj"), ("q_norm", "self_attn.q_norm"),
        ("k", "self_attn.k_proj"), ("k_norm", "self_attn.k_norm"), ("v", "self_attn.v_proj"),
        *_O, ("ln_mlp", "post_attention_layernorm"), *_GLU), **_LLAMA_GLOBALS),
    Adapter("gemma2", "model.layers", _GEMMA2_BLOCK, **_LLAMA_GLOBALS,
            notes="pre- and post-norms around attention and MLP; both count as ln_attn / ln_mlp"),
    Adapter("gemma3_text", "model.layers", (
        ("ln_attn", "input_layernorm"), *_ATTN, ("q_norm", "self_attn.q_norm"),
        ("k_norm", "self_attn.k_norm"), *_O, ("ln_attn", "post_attention_layernorm"),
        ("ln_mlp", "pre_feedforward_layernorm"), *_GLU, ("ln_mlp", "post_feedforward_layernorm"),
    ), **_LLAMA_GLOBALS, token_axes=(("self_attn.q_norm", 2), ("self_attn.k_norm", 2)),
        notes="q_norm / k_norm see (batch, heads, tokens, head_dim)"),
    Adapter("olmo", "model.layers", (*_ATTN, *_O, *_GLU), embed="model.embed_tokens",
            notes="OLMo-1 (hf): layer norms have no weights"),
    Adapter("olmo2", "model.layers", (
        ("q", "self_attn.q_proj"), ("q_norm", "self_attn.q_norm"), ("k", "self_attn.k_proj"),
        ("k_norm", "self_attn.k_norm"), ("v", "self_attn.v_proj"), *_O,
        ("ln_attn", "post_attention_layernorm"), *_GLU, ("ln_mlp", "post_feedforward_layernorm"),
    ), **_LLAMA_GLOBALS, notes="norms come after attention / MLP (no pre-norms)"),
    Adapter("gpt2", "transformer.h", (
        ("ln_attn", "ln_1"), ("q", "attn.c_attn"), ("k", "attn.c_attn"), ("v", "attn.c_attn"),
        ("o", "attn.c_proj"), ("ln_mlp", "ln_2"), ("up", "mlp.c_fc"), ("down", "mlp.c_proj"),
    ), embed="transformer.wte", pos_embed="transformer.wpe", ln_final="transformer.ln_f",
        fused_qkv="concat", notes="Conv1D weights are stored (in, out); c_attn is [Q|K|V]"),
    Adapter("gpt_neox", "gpt_neox.layers", (
        ("ln_attn", "input_layernorm"), ("q", "attention.query_key_value"),
        ("k", "attention.query_key_value"), ("v", "attention.query_key_value"),
        ("o", "attention.dense"), ("ln_mlp", "post_attention_layernorm"),
        ("up", "mlp.dense_h_to_4h"), ("down", "mlp.dense_4h_to_h"),
    ), embed="gpt_neox.embed_in", ln_final="gpt_neox.final_layer_norm",
        fused_qkv="per_head", notes="Pythia; query_key_value is interleaved per head"),
):
    register_adapter(_adapter)


def adapter_for_model_type(model_type: str) -> Adapter:
    """Look up the adapter for a Hugging Face ``model_type``."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise UnsupportedArchitectureError(
            f"no nngraft adapter for model_type {model_type!r} (known: {known}). Register one: "
            "nngraft.arch.register_adapter(Adapter(model_type=..., layers_path=..., block=(...), "
            "embed=..., ln_final=..., lm_head=...)) — see docs/architectures.md."
        ) from None


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for a loaded Hugging Face model (from ``model.config.model_type``).

    Example:
        >>> from nngraft import adapter_for
        >>> from nngraft.testing import tiny_pair
        >>> adapter = adapter_for(tiny_pair("llama")[0])
        >>> adapter.layers_path, adapter.components
        ('model.layers', ('embed', 'ln_final', 'lm_head', 'ln_attn', 'q', 'k', 'v', 'o', 'ln_mlp', 'gate', 'up', 'down'))
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; nngraft needs a Hugging Face model"
        )
    adapter = adapter_for_model_type(model_type)
    adapter.check_model(model)
    return adapter


def adapters_markdown() -> str:
    """The adapter table as Markdown (pasted into docs/architectures.md; a test keeps it current)."""
    lines = ["| model_type | blocks at | component → module (per block, forward order) | outside the blocks | notes |",
             "| --- | --- | --- | --- | --- |"]
    seen: set[int] = set()
    for key, adapter in sorted(ADAPTERS.items()):
        if id(adapter) in seen:
            continue
        seen.add(id(adapter))
        names = ", ".join(f"`{n}`" for n in (adapter.model_type, *adapter.aliases))
        block = "<br>".join(f"{c}: `{p}`" + (f" ({adapter.fused_qkv} slice)" if adapter.fused_qkv and c in "qkv" else "")
                            for c, p in adapter.block)
        outside = "<br>".join(f"{c}: `{getattr(adapter, c)}`" for c in GLOBAL_COMPONENTS if getattr(adapter, c))
        lines.append(f"| {names} | `{adapter.layers_path}` | {block} | {outside} | {adapter.notes} |")
    return "\n".join(lines)
