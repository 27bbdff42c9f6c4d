"""The paper's method, literally: the oracle that nngraft's one-pass grafting is tested against.

Process the prompt one token at a time with a KV cache. Before each token, the recipient's weights
are set to F's for the components grafted at that position and to P's for everything else; the
token is then run through the model alone. Keys and values cached at a position were therefore
computed with the weights active when that position was processed — the defining property of
dynamic weight grafting (Nief et al., ``run_patched_inference``).

Differences from the paper's code, none of which change what is computed:
- one copy of P whose weights are swapped in place and restored, instead of a fresh deep copy of
  P per token (same weights at every step);
- tied embeddings are untied in the copy, so grafting ``embed`` does not also graft ``lm_head``
  (in the paper's code loading the embedding state dict silently swapped the LM head too);
- fused projections (GPT-2 ``c_attn``, NeoX ``query_key_value``) swap only the weight rows (GPT-2
  Conv1D: columns) and bias entries of the grafted q/k/v features.

This module deliberately shares nothing with ``nngraft.backends.local`` or ``nngraft.compile.plan``: only the
adapter's component → module map, which the architecture tests check separately.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Iterable, Mapping, Sequence

import torch

from nngraft.arch import Adapter, get_module

Swap = tuple  # (full parameter name, index into the parameter; () = all of it[, donor model])


def component_swaps(model: torch.nn.Module, adapter: Adapter, component: str, layer: int | None) -> list[Swap]:
    """The parameter entries that make up ``component`` at ``layer``."""
    swaps: list[Swap] = []
    for site in adapter.sites(component, layer, model.config):
        module = get_module(model, site.path)
        for name, param in module.named_parameters():
            full = f"{site.path}.{name}"
            if site.features is None:
                swaps.append((full, ()))
                continue
            feats = torch.tensor(site.features)
            transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores weights as (in, out)
            if name == "weight" and transposed:
                swaps.append((full, (slice(None), feats)))
            else:
                swaps.append((full, (feats,)))
    return swaps


def module_swaps(model: torch.nn.Module, path: str) -> list[Swap]:
    """Every parameter under a module (e.g. a whole ``self_attn`` block)."""
    return [(f"{path}.{name}", ()) for name, _ in get_module(model, path).named_parameters()]


def _untied_copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    seen: dict[int, str] = {}
    for name, param in list(clone.named_parameters(remove_duplicate=False)):
        if id(param) in seen:
            owner_path, _, leaf = name.rpartition(".")
            owner = get_module(clone, owner_path) if owner_path else clone
            setattr(owner, leaf, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
        else:
            seen[id(param)] = name
    return clone


def per_token_reference(
    P: torch.nn.Module,
    F: torch.nn.Module,
    ids: Iterable[int],
    swaps_at: Callable[[int], list[Swap]],
    *,
    new_tokens: int = 0,
) -> tuple[torch.Tensor, list[int]]:
    """Logits at every position (L, vocab) and ``new_tokens`` greedy continuations.

    ``swaps_at(t)`` lists the parameter entries that hold F's values while token ``t`` is
    processed (prompt tokens first, then generated ones). An entry may name another donor model
    as a third element: ``(name, index, G)`` takes G's values instead of F's.
    """
    logits, tokens, _ = per_token_activations(P, F, ids, swaps_at, new_tokens=new_tokens)
    return logits, tokens


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def per_token_activations(
    P: torch.nn.Module,
    F: torch.nn.Module,
    ids: Iterable[int],
    swaps_at: Callable[[int], list[Swap]],
    *,
    new_tokens: int = 0,
    record: Sequence[str] = (),
    edits: Mapping[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
    """:func:`per_token_reference`, also recording the output (first element of a tuple) of each
    module in ``record`` at every position — ``{path: (L, ...)}`` — and applying ``edits``: for a
    module path, ``fn(output, t)`` returns the output that module passes on at token ``t`` (the
    user intervention a test composes with a graft; ``output`` is that token's ``(1, 1, ...)``
    slice)."""
    R = _untied_copy(P).eval()
    device = next(R.parameters()).device
    r_params = dict(R.named_parameters(remove_duplicate=False))
    p_params = dict(P.named_parameters(remove_duplicate=False))
    f_params = dict(F.named_parameters(remove_duplicate=False))
    cache_kw = "cache" if "cache" in inspect.signature(R.forward).parameters else "past_key_values"

    step = {"t": 0}
    recorded: dict[str, list[torch.Tensor]] = {path: [] for path in record}
    hooks = []

    def hook_for(path: str):
        def hook(module, args, output):
            edit = (edits or {}).get(path)
            if edit is not None:
                new = edit(_first(output).clone(), step["t"])
                output = (new, *output[1:]) if isinstance(output, tuple) else new
            if path in recorded:
                recorded[path].append(_first(output)[0, -1].clone())
            return output
        return hook

    for path in dict.fromkeys([*record, *(edits or {})]):
        hooks.append(get_module(R, path).register_forward_hook(hook_for(path)))
    try:
        sequence = list(ids)
        prompt_len = len(sequence)
        cache = None
        active: list[Swap] = []
        logits: list[torch.Tensor] = []
        t = 0
        while t < prompt_len + new_tokens:
            for name, index, *_ in active:  # restore P's weights
                r_params[name].data[index] = p_params[name].data[index]
            active = swaps_at(t)
            for name, index, *donor in active:  # F's (or the named donor's) weights for this token
                source = dict(donor[0].named_parameters(remove_duplicate=False)) if donor else f_params
                r_params[name].data[index] = source[name].data[index]
            kwargs = {cache_kw: cache} if cache is not None else {}
            step["t"] = t
            out = R(input_ids=torch.tensor([[sequence[t]]], device=device), position_ids=torch.tensor([[t]], device=device),
                    use_cache=True, **kwargs)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            if t == len(sequence) - 1 and len(sequence) < prompt_len + new_tokens:
                sequence.append(int(out.logits[0, -1].argmax()))
            t += 1
    finally:
        for handle in hooks:
            handle.remove()
    return torch.stack(logits), sequence[prompt_len:], {k: torch.stack(v) for k, v in recorded.items()}
