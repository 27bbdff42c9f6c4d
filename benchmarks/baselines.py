"""The baselines nngraft's one-pass graft is timed against.

- :func:`paper_method` — the paper's ``run_patched_inference``, faithfully: for each token, a
  fresh ``copy.deepcopy`` of P; for each grafted (layer, target) at that token,
  ``load_state_dict`` of F's submodule into the copy; then a one-token forward with the KV cache of
  the earlier steps. Batch size 1: examples run one after another.
- :func:`per_token_inplace` — the best per-token variant: the same loop without the deep copy; F's
  parameter tensors are swapped into P's parameter objects (``param.data = ...``, no copying) for
  the grafted token and swapped back right after.
- :func:`plain_forward` — P's forward with no nnsight involved (P never wrapped by nnsight).
- :func:`empty_trace` — an nnsight trace of the Grafter's P that only saves the output.

The first two compute every position's logits the way the paper does; ``tests/helpers/reference.py`` is
the test suite's copy of the same method (the smoke test checks all three agree). They support
block components whose modules hold their whole parameters (Llama-style separate q/k/v/o and MLP
projections), which is what the benchmarks graft; fused QKV slices and tied embeddings are out of
scope here.

Example:
    >>> from nngraft.testing import tiny_pair
    >>> from nngraft.arch import adapter_for
    >>> P, F, tok = tiny_pair("llama")
    >>> paths = graft_paths(adapter_for(P), P.config, ["mlp"], [1])
    >>> paths
    ['model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj', 'model.layers.1.mlp.down_proj']
    >>> ids = tok("Ada Lovelace stars in")["input_ids"]
    >>> a = paper_method(P, F, ids, {len(ids) - 1: paths})
    >>> b = per_token_inplace(P, F, ids, {len(ids) - 1: paths})
    >>> bool((a - b).abs().max() < 1e-5), tuple(a.shape) == (len(ids), P.config.vocab_size)
    (True, True)
"""

from __future__ import annotations

import copy
import inspect
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch


def graft_paths(adapter: Any, config: Any, components: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Module paths of ``components`` (groups such as ``mlp`` expanded to gate/up/down, as the
    paper's ``PatchTargets`` list them) at ``layers``, in the paper's loop order (layer, target)."""
    block, global_ = adapter.expand(list(components))
    if global_:
        raise ValueError(f"the benchmark baselines graft block components only, not {global_}")
    paths: list[str] = []
    for layer in layers:
        for component in block:
            for site in adapter.sites(component, layer, config):
                if site.features is not None:
                    raise ValueError(f"{component} is a slice of a fused projection ({site.path}); "
                                     "the benchmark baselines support separate projections only")
                paths.append(site.path)
    return paths


class _Clock:
    """``with clock("phase"):`` adds the block's seconds to ``stats[phase]`` (no-op without stats)."""

    def __init__(self, stats: dict[str, float] | None) -> None:
        self.stats = stats

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.stats is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[phase] = self.stats.get(phase, 0.0) + time.perf_counter() - start


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    return out.cache if "cache" in getattr(out, "keys", lambda: ())() else out.past_key_values


def _cache_kw(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def paper_method(P: torch.nn.Module, F: torch.nn.Module, ids: Sequence[int],
                 patches: Mapping[int, Sequence[str]], *,
                 stats: dict[str, float] | None = None) -> torch.Tensor:
    """Logits at every position (L, vocab), computed as the paper's ``run_patched_inference``.

    ``patches[t]`` lists the module paths whose weights come from F while token ``t`` is
    processed (absent: none). ``stats``, if given, accumulates the seconds spent in
    ``deepcopy``, ``load_state_dict`` and ``forward``."""
    cache_kw = _cache_kw(P)
    cache = None
    logits = []
    input_ids = torch.tensor([list(ids)])
    clock = _Clock(stats)
    for idx in range(input_ids.shape[1]):
        with clock("deepcopy"):
            recipient = copy.deepcopy(P)  # the paper: a fresh copy of the whole model for every token
        with clock("load_state_dict"):
            for path in patches.get(idx, ()):
                recipient.get_submodule(path).load_state_dict(F.get_submodule(path).state_dict())
        kwargs = {cache_kw: cache} if cache is not None else {}
        with clock("forward"):
            out = recipient(input_ids=input_ids[:, idx:idx + 1], use_cache=True, **kwargs)
        cache = _cache_of(out)
        logits.append(out.logits[0, -1])
        del recipient
    return torch.stack(logits)


@torch.no_grad()
def per_token_inplace(P: torch.nn.Module, F: torch.nn.Module, ids: Sequence[int],
                      patches: Mapping[int, Sequence[str]]) -> torch.Tensor:
    """Like :func:`paper_method`, but F's tensors are swapped into P's parameters in place (no
    copy of the model, no copy of a tensor) for the grafted tokens, and always swapped back."""
    cache_kw = _cache_kw(P)
    cache = None
    logits = []
    input_ids = torch.tensor([list(ids)])
    for idx in range(input_ids.shape[1]):
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for path in patches.get(idx, ()):
                donor = dict(F.get_submodule(path).named_parameters())
                for name, param in P.get_submodule(path).named_parameters():
                    saved.append((param, param.data))
                    param.data = donor[name].data
            kwargs = {cache_kw: cache} if cache is not None else {}
            out = P(input_ids=input_ids[:, idx:idx + 1], use_cache=True, **kwargs)
        finally:
            for param, data in reversed(saved):
                param.data = data
        cache = _cache_of(out)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def model_kwargs(model: torch.nn.Module, batch: Any) -> dict[str, Any]:
    """The keyword arguments ``Grafter.forward`` passes for a padded batch (no cache, only the
    last position's logits when the model supports ``logits_to_keep``)."""
    kwargs: dict[str, Any] = dict(batch.model_inputs(), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


@torch.no_grad()
def plain_forward(P: torch.nn.Module, batch: Any) -> torch.Tensor:
    """P's logits at the last column of a padded batch, with the same inputs the Grafter feeds."""
    return P(**model_kwargs(P, batch)).logits[:, -1]


@torch.no_grad()
def empty_trace(grafter: Any, batch: Any) -> torch.Tensor:
    """The same forward inside an nnsight trace of the Grafter's P that does nothing but save the
    output: the fixed cost nnsight adds to every graft."""
    with grafter.setup.envoy.trace(**model_kwargs(grafter.model, batch)):
        out = grafter.setup.envoy.output.save()
    return out.logits[:, -1]
