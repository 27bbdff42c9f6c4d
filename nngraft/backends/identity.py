"""The identity guard: on a Grafter's first run, the empty spec must give P and "everything" must give F.

Two identities hold for every correct graft, whatever the model: a row with no rule is P's own
forward pass, and a row that grafts every component at every position is F's. :func:`check_identities`
checks both once per Grafter, on the run's first prompt, in one extra forward pass of three rows
(the empty spec and "everything" on that prompt, and the run's own first graft on another prompt
of a different length, so that rows are left-padded beside a grafted one as in a real batch) plus
a plain forward of P and of F. When
an identity fails, the error says what differs between P and F outside the grafted weights
(config entries, buffers such as rotary frequencies, module settings such as a norm's epsilon) or,
for P, that rows of a batch are not independent.

The F half needs F as a loaded model (a :class:`~nngraft.donors.donor.ModelDonor`, or a remote
:class:`~nngraft.donors.delta.DenseDonor` / full-rank :class:`~nngraft.donors.delta.DeltaDonor` made
from one); for a donor known only by its tensors (a checkpoint path, a LoRA adapter, a low-rank
delta) F's config is compared at attach time instead (``check_against``).

On a remote backend (NDIF or its stand-ins) the three rows are one extra request, and P's plain
forward pass one more (the empty spec alone, on the server's P); the F half is left out when "everything" would not fit one request (F's plain pass
runs here). Donor tensors that travel in half precision widen the tolerance as half precision
does. The error texts are the same on every backend. Switch the guard off with
``Grafter(..., check_identities=False)`` or the environment variable ``NNGRAFT_IDENTITY_CHECK=0``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from ..compile.plan import compile_plan
from ..compile.tokens import TokenizedPrompt, pad_left
from ..donors.donor import ModelDonor, config_differences
from ..errors import GraftError, IdentityCheckError
from ..spec import All, GraftRule, GraftSpec

ENV = "NNGRAFT_IDENTITY_CHECK"
EVERYTHING = GraftSpec(name="everything", rules=[GraftRule(components=["everything"], positions=[All()])])
EMPTY = GraftSpec(name="p")
SWITCH = f"check_identities=False (Grafter) or {ENV}=0 switches this check off"


def enabled(flag: bool) -> bool:
    """Whether the guard runs: the Grafter's ``check_identities`` and the environment allow it."""
    return flag and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def tolerance(dtype: torch.dtype) -> float:
    """Largest |Δ log-probability| accepted: float32 rounding of a batched vs a single forward pass
    is ~1e-6; half precision rounds far more."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.25


def _last_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _plain(model: torch.nn.Module, ids: Sequence[int], device: Any) -> torch.Tensor:
    # the ids go where the model's token embedding reads them (P or F may sit on a GPU, or be split
    # over several, while the batch is built on ``device``)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        device = weight.device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return _last_logprobs(out.logits[0, -1]).cpu()


def finetuned_model(donor: Any) -> torch.nn.Module | None:
    """F as a loaded model, where the donor holds one that it grafts exactly."""
    if isinstance(donor, ModelDonor):
        return donor.model
    model = getattr(donor, "finetuned_model", None)
    return model if isinstance(model, torch.nn.Module) else None


def _has_weights(model: torch.nn.Module) -> bool:
    return all(p.device.type != "meta" for p in model.parameters())


def check_identities(forward: Callable[..., Any], model: torch.nn.Module, donor: Any, adapter: Any,
                     specs: Sequence[GraftSpec], prompts: Sequence[TokenizedPrompt], pad_id: int,
                     device: Any, *, with_f: bool = True, travel_dtype: torch.dtype | None = None,
                     remote: bool = False) -> None:
    """Raise :class:`~nngraft.errors.IdentityCheckError` unless the empty spec reproduces P and
    "everything" reproduces F (when ``donor`` holds F as a loaded model, and ``with_f``) on
    ``prompts[0]``, in one pass beside the run's own first graft (``specs[i]`` on ``prompts[i]``)
    on a longer prompt.

    ``forward(plan, batch)`` is the Grafter's forward pass (returns ``(logits, cache)``), here or
    remote; ``travel_dtype``: the dtype donor tensors travel in to a remote backend; ``remote``: P's
    plain pass is the empty spec alone through ``forward`` (the server's P, which may carry a gated
    Hub adapter), not the local copy's."""
    i = max(range(len(prompts)), key=lambda k: (bool(specs[k].rules), len(prompts[k])))
    beside, other = specs[i], prompts[i]
    first = prompts[0]
    shown = repr(first.text)
    if len(first) >= len(other):  # no longer prompt in the run: P's row is made longer instead
        first = TokenizedPrompt(first.text + " " + first.text, tuple(first.ids) * 2)
        shown += " (twice)"
    F = finetuned_model(donor) if with_f else None
    rows = [(EMPTY, first), (beside, other)] + ([(EVERYTHING, first)] if F is not None else [])
    try:
        plan = compile_plan([s for s, _ in rows], adapter, model.config, [p for _, p in rows])
    except GraftError:  # a spec that does not fit the run: the run itself says so, with its own rows
        return
    batch = pad_left([p.ids for _, p in rows], pad_id, device)
    logits, _ = forward(plan, batch)
    got = _last_logprobs(logits[:, -1]).cpu()
    dtype = next(model.parameters()).dtype
    tol = max(tolerance(dtype), tolerance(travel_dtype or dtype))
    if not remote:
        plain = _plain(model, first.ids, device)
    else:  # P runs elsewhere: its plain pass is the empty spec alone, in a request of its own
        alone, _ = forward(compile_plan([EMPTY], adapter, model.config, [first]), pad_left([first.ids], pad_id, device))
        plain = _last_logprobs(alone[0, -1]).cpu()
    gap = float((got[0] - plain).abs().max())
    if not gap <= tol:
        raise IdentityCheckError(
            f"identity check failed: the empty spec does not reproduce P on {shown} (max |Δ log-prob| "
            f"{gap:.3g} > {tol:g}) between P's plain forward pass and its row in a batch beside grafted, "
            f"left-padded rows: the rows of a batch are not independent (a hook left on P, or an attention "
            f"implementation that mixes padded rows: {getattr(model.config, '_attn_implementation', '?')}). "
            f"No result of this Grafter can be trusted; {SWITCH}")
    if F is None:
        return
    gap = float((got[2] - _plain(F, first.ids, device)).abs().max())
    if not gap <= tol:
        raise IdentityCheckError(
            f"identity check failed: grafting everything does not reproduce F on {shown} (max |Δ "
            f"log-prob| {gap:.3g} > {tol:g}), so P with F's weights is not F: {describe_differences(model, F)}. "
            f"Grafts would mix P's and F's settings; {SWITCH}")


def describe_differences(P: torch.nn.Module, F: torch.nn.Module) -> str:
    """What differs between two models besides their parameters: config entries that change the
    computation, buffers (rotary frequencies …), and modules' number/text settings (a norm's
    epsilon …), at most six named."""
    found = [f"config {k}: P {a!r}, F {b!r}" for k, a, b in config_differences(P.config, F.config)]
    theirs = dict(F.named_buffers())
    for name, mine in P.named_buffers():
        if mine.device.type == "meta":  # P hosted elsewhere: its buffers are not here to compare
            continue
        other = theirs.get(name)
        if other is None or other.shape != mine.shape or not torch.equal(other.to(mine.device, mine.dtype), mine):
            found.append(f"buffer {name!r}" + (" (missing in F)" if other is None else ""))
    modules = dict(F.named_modules())
    labels = {"name_or_path"} | ({"training"} if not _has_weights(P) else set())  # a hosted P's copy here never runs
    for path, module in P.named_modules():
        other = modules.get(path)
        if other is None:
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or key in labels or not isinstance(value, (int, float, str, bool)):
                continue
            if getattr(other, key, value) != value:
                found.append(f"{path or 'model'}.{key}: P {value!r}, F {getattr(other, key)!r}")
    if not found:
        return ("no config entry, buffer or module setting differs, which points to a bug in nngraft or "
                "in the model's code: please report it")
    more = f" (and {len(found) - 6} more)" if len(found) > 6 else ""
    return "; ".join(found[:6]) + more
