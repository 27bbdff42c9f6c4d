"""Donors: where the finetuned weights come from.

Execution never calls a donor *module*. It runs the recipient's own module with the donor's
parameters swapped in (``torch.func``-style reparametrization), so every donor only has to answer
one question: *what are F's parameters of the module at this path?*

- :class:`ModelDonor` — a loaded finetuned model (``transformers`` object).
- :class:`SafetensorsDonor` — a checkpoint folder or file; reads only the tensors a plan needs.
- :class:`TensorDonor` — a dict of tensors ``{"model.layers.3.mlp.up_proj.weight": W, ...}``.

Every donor's parameters are checked against the recipient's shapes and cast to the recipient's
dtype and device (documented in docs/errors.md: floating dtypes are cast, shapes must match).

Example:
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> donor = ModelDonor(F)
    >>> sorted(donor.params("model.layers.0.mlp.up_proj", P.model.layers[0].mlp.up_proj))
    ['weight']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from ..arch import COMPUTATION_CONFIG_KEYS, CHECKPOINT_RENAMES, checkpoint_prefixes, get_module, tied_alternatives
from ..errors import DonorMismatchError


LEGACY_BUFFERS = ("attn.bias", "attn.masked_bias")
"""Checkpoint entries that are buffers older transformers saved (GPT-2's causal mask), not weights."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Checkpoint formats that are pickles: refused, never loaded."""



_LABELS = {"num_hidden_layers": "depth", "hidden_size": "width", "intermediate_size": "MLP width",
           "num_attention_heads": "heads", "num_key_value_heads": "key/value heads", "head_dim": "head size",
           "vocab_size": "vocabulary"}

FINETUNED_COPY = "grafting needs F to be a finetuned copy of P (same architecture, size and settings)"


def _config_dict(config: Any) -> dict[str, Any]:
    """A config (object or ``config.json`` dict) as a dict in the standard spelling: GPT-2's
    ``n_layer`` also as ``num_hidden_layers``; a raw dict goes through the recipient's config class
    where it can, so older spellings (``rope_theta``) read as the current ones."""
    if isinstance(config, Mapping):
        return dict(config)
    values = config.to_dict()
    for alias, real in getattr(config, "attribute_map", {}).items():
        if real in values:
            values.setdefault(alias, values[real])
    return values


def _same(a: Any, b: Any) -> bool:
    """Equal as a forward pass sees them: floats compared in float32 (a GGUF round trip stores
    1e-5 as 9.999999747378752e-06, the same float32)."""
    import numpy as np

    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.float32(a) == np.float32(b)
    return a == b


def _differences(mine: Any, theirs: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
        return [d for k in sorted(set(mine) | set(theirs), key=str)
                for d in _differences(mine.get(k), theirs.get(k), f"{key}.{k}")]
    return [] if _same(mine, theirs) else [(key, mine, theirs)]


def config_differences(recipient: Any, donor: Any) -> list[tuple[str, Any, Any]]:
    """``(key, recipient's value, donor's value)`` for every :data:`~nngraft.arch.COMPUTATION_CONFIG_KEYS`
    entry where two configs (objects or ``config.json`` dicts) differ; nested settings
    (``rope_parameters``) by their inner key.

    Example:
        >>> from nngraft.testing import tiny_config
        >>> a, b = tiny_config("llama"), tiny_config("llama")
        >>> b.rms_norm_eps = 1e-3
        >>> config_differences(a, b)
        [('rms_norm_eps', 1e-06, 0.001)]
    """
    if isinstance(donor, Mapping) and not isinstance(recipient, Mapping) and \
            donor.get("model_type") == getattr(recipient, "model_type", None):
        try:  # read the file as the recipient's config class reads it (defaults, renamed entries)
            donor = type(recipient).from_dict(dict(donor))
        except Exception:  # noqa: BLE001 - an unreadable config is compared as it is
            pass
    mine, theirs = _config_dict(recipient), _config_dict(donor)
    found = []
    for key in COMPUTATION_CONFIG_KEYS:
        if key in mine or key in theirs:
            found += _differences(mine.get(key), theirs.get(key), key)
    return list(dict.fromkeys(found))


def check_configs(recipient: Any, donor: Any, what: str = "the donor") -> None:
    """Refuse a donor whose config (object or ``config.json`` dict) computes differently from the
    recipient's, naming every entry that differs (:func:`config_differences`). ``what`` names the
    donor in the message."""
    found = config_differences(recipient, donor)
    if found:
        shown = "; ".join(f"the recipient has {_LABELS[k] + ' ' if k in _LABELS else ''}{k}={a!r} but the donor has "
                          f"{k}={b!r}" for k, a, b in found[:6])
        more = f" (and {len(found) - 6} more)" if len(found) > 6 else ""
        raise DonorMismatchError(f"{what} computes differently from the recipient: {shown}{more}; {FINETUNED_COPY}")


class Donor(Protocol):
    """Anything that returns F's parameters for the recipient module at ``path``.

    Example (a donor of your own: P and F averaged, module by module):
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> class Halfway:
        ...     def params(self, path, module):
        ...         f = dict(F.get_submodule(path).named_parameters())
        ...         return {name: (p + f[name]) / 2 for name, p in module.named_parameters()}
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> Grafter(P, Halfway(), tok).run(spec, ["Ada Lovelace stars in"]).logits.shape
        torch.Size([1, 336])
    """

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """F's parameters for ``module`` (named as in ``module.named_parameters()``)."""


def _fit(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tensor.is_meta:
        raise DonorMismatchError(f"donor tensor {name!r} is on the meta device (no weights loaded); load F "
                                 "with its weights")
    if tuple(tensor.shape) != tuple(like.shape):
        raise DonorMismatchError(
            f"donor tensor {name!r} has shape {tuple(tensor.shape)} but the recipient's has "
            f"{tuple(like.shape)}; are both models the same architecture and size?"
        )
    if tensor.dtype != like.dtype or tensor.device != like.device:
        if not tensor.dtype.is_floating_point:
            raise DonorMismatchError(f"donor tensor {name!r} has non-float dtype {tensor.dtype}")
        tensor = tensor.to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise DonorMismatchError(f"donor tensor {name!r} holds {bad} NaN or infinite value(s) (in the "
                                 f"recipient's dtype {str(like.dtype).removeprefix('torch.')}); the finetuned "
                                 "model is broken (a diverged finetune?) or does not fit that dtype")
    return tensor


def module_params(cache: dict[str, dict[str, torch.Tensor]], path: str, module: torch.nn.Module,
                  value: Callable[[str, str, torch.nn.Parameter], torch.Tensor]) -> dict[str, torch.Tensor]:
    """F's parameters of ``module`` (at ``path`` in P), by parameter name, computed once per path and
    kept in ``cache``: ``value(full name, name, P's parameter)`` for each of the module's parameters
    (nothing is kept if one of them fails). The per-module cache of every local donor.

    Example:
        >>> cache, lin = {}, torch.nn.Linear(2, 2)
        >>> got = module_params(cache, "fc", lin, lambda full, name, p: torch.zeros_like(p))
        >>> sorted(got), module_params(cache, "fc", lin, None) is got
        (['bias', 'weight'], True)
    """
    found = cache.get(path)
    if found is None:
        found = cache[path] = {name: value(f"{path}.{name}", name, p) for name, p in module.named_parameters()}
    return found


class _CachingDonor:
    """Shared logic: fetch F's tensors for a module once, check them, keep them."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return module_params(self._cache, path, module,
                             lambda full, name, like: _fit(full, self._tensor_or_tied(full), like))

    def _tensor_or_tied(self, name: str) -> torch.Tensor:
        try:
            return self._tensor(name)
        except DonorMismatchError:
            alternatives = tied_alternatives(name)
            if not alternatives:
                raise
            # Tied embeddings: checkpoints and named_parameters() keep only the input side.
            for alt in alternatives:
                try:
                    return self._tensor(alt)
                except DonorMismatchError:
                    continue
            raise

    def _tensor(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def clear(self) -> None:
        """Forget cached tensors (frees memory between studies)."""
        self._cache.clear()


class ModelDonor(_CachingDonor):
    """F as a loaded model. Tensors are shared, not copied, when dtype and device already match.

    Example (``Grafter(P, F, tok)`` wraps F in one):
        >>> from nngraft import ModelDonor
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> up = ModelDonor(F).params("model.layers.0.mlp.up_proj", P.model.layers[0].mlp.up_proj)
        >>> up["weight"] is F.model.layers[0].mlp.up_proj.weight
        True
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def _tensor(self, name: str) -> torch.Tensor:
        path, _, leaf = name.rpartition(".")
        try:
            return getattr(get_module(self.model, path), leaf)
        except AttributeError:
            raise DonorMismatchError(
                f"the donor model ({type(self.model).__name__}) has no parameter {name!r}; "
                "is it the same architecture as the recipient?"
            ) from None

    def check_against(self, recipient: torch.nn.Module) -> None:
        """Refuse a donor of another architecture or size, naming what differs."""
        rc, dc = getattr(recipient, "config", None), getattr(self.model, "config", None)
        if rc is not None and dc is not None and rc.model_type != dc.model_type:
            raise DonorMismatchError(
                f"recipient is a {rc.model_type!r} model but the donor is {dc.model_type!r}; "
                "grafting needs F to be a finetuned copy of P"
            )
        if rc is not None and dc is not None:
            check_configs(rc, dc, f"the donor ({type(self.model).__name__})")
        theirs = dict(self.model.named_parameters())
        mine_params = dict(recipient.named_parameters())
        for name, p in mine_params.items():
            if name not in theirs:
                raise DonorMismatchError(f"the donor has no parameter {name!r}; F must be a finetuned copy of P")
            if theirs[name].shape != p.shape:
                raise DonorMismatchError(
                    f"parameter {name!r}: recipient shape {tuple(p.shape)}, donor shape "
                    f"{tuple(theirs[name].shape)}; F must be a finetuned copy of P"
                )
        extra = [name for name in theirs if name not in mine_params]
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise DonorMismatchError(
                f"the donor has parameter {extra[0]!r}{more}, which the recipient lacks (is F larger or "
                "deeper than P?); F must be a finetuned copy of P"
            )
        for name, p in theirs.items():
            if p.is_meta:
                raise DonorMismatchError(
                    f"the donor's parameter {name!r} is on the meta device (no weights loaded); load F with "
                    "its weights (e.g. from_pretrained without device_map='meta' / init_empty_weights)"
                )


class TensorDonor(_CachingDonor):
    """F's tensors by full parameter name, e.g. from ``model.state_dict()`` or a computation.

    Example (only the tensors a spec grafts are needed):
        >>> import torch
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last, TensorDonor
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> mlps = TensorDonor({name: t for name, t in F.state_dict().items() if ".mlp." in name})
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> torch.equal(Grafter(P, mlps, tok).run(spec, ["Ada Lovelace stars in"]).logits,
        ...             Grafter(P, F, tok).run(spec, ["Ada Lovelace stars in"]).logits)
        True
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, source: str = "tensor dict") -> None:
        super().__init__()
        from ..util.checks import fail

        if not isinstance(tensors, Mapping):
            raise fail("TensorDonor", "tensors", "a dict of parameter name → tensor", tensors)
        for name, value in tensors.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise fail("TensorDonor", f"tensors[{name!r}]", "a tensor under a parameter name (str)", value)
        self.tensors = dict(tensors)
        self.source = source

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise DonorMismatchError(
                f"the donor ({self.source}) has no tensor {name!r}, which this graft needs"
            ) from None


class SafetensorsDonor(_CachingDonor):
    """F from a ``.safetensors`` file or a folder of them (sharded checkpoints included).

    Only the tensors a graft touches are read (memory-mapped), so grafting the last four MLPs of
    a 70B model needs only those MLPs in memory. Checkpoint names may lack the model's prefix
    (``h.0.mlp`` for ``transformer.h.0.mlp``); pass ``prefix`` (default: tried automatically).
    Loading never unpickles anything.

    Example (a file holding only F's MLPs is enough to graft them):
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last, SafetensorsDonor
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file({n: t for n, t in F.state_dict().items() if ".mlp." in n}, f"{folder}/mlp.safetensors")
        ...     logits = Grafter(P, SafetensorsDonor(folder), tok).run(spec, ["Ada Lovelace stars in"]).logits
        >>> torch.allclose(logits, Grafter(P, F, tok).run(spec, ["Ada Lovelace stars in"]).logits, atol=1e-5)
        True
    """

    def __init__(self, path: str | Path, *, prefixes: tuple[str, ...] | None = None) -> None:
        super().__init__()
        from safetensors import safe_open

        self.path = Path(path)
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            others = sorted(f.name for f in self.path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        else:
            files = [self.path] if self.path.suffix == ".safetensors" and self.path.exists() else []
            others = [self.path.name] if self.path.exists() and not files else []
        if not files and others:
            raise DonorMismatchError(
                f"{self.path} holds no .safetensors weights, only {', '.join(others)}. nngraft never "
                "unpickles weight files (.bin/.pt/.pth/.ckpt are pickles; loading one can run code). "
                "Convert it once: safetensors.torch.save_file(torch.load(FILE, weights_only=True), "
                "'model.safetensors'), or F.save_pretrained(DIR); or load F with transformers and "
                "pass the model"
            )
        if not files:
            raise DonorMismatchError(f"no .safetensors weights found at {self.path}")
        self._index: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        self._index[key] = file
            except Exception as error:  # noqa: BLE001 - safetensors' own error type is not public
                raise DonorMismatchError(f"{file} is not a readable .safetensors file ({error})") from None
        self._prefixes = checkpoint_prefixes() if prefixes is None else prefixes

    def check_against(self, recipient: torch.nn.Module) -> None:
        """Refuse a checkpoint that is not a finetuned copy of ``recipient``: a ``config.json``
        beside it that computes differently (:func:`check_configs`), a tensor whose shape differs
        (read from the file headers, no weights loaded), or weight tensors the recipient lacks
        (a deeper or wider F). A bare ``.safetensors`` file has no config: only shapes are checked."""
        from safetensors import safe_open

        config = read_config(self.path)
        rc = getattr(recipient, "config", None)
        if config and rc is not None:
            if config.get("model_type") not in (None, rc.model_type):
                raise DonorMismatchError(f"the donor checkpoint {self.path} is a {config.get('model_type')!r} model "
                                         f"but the recipient is {rc.model_type!r}; {FINETUNED_COPY}")
            check_configs(rc, config, f"the donor checkpoint {self.path}")
        used: set[str] = set()
        for name, like in recipient.named_parameters(remove_duplicate=False):
            key = self._key(name)
            if key is None:
                continue  # a missing tensor is refused when a graft needs it (tied heads are often not stored)
            used.add(key)
            with safe_open(str(self._index[key]), framework="pt") as handle:
                shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(like.shape):
                raise DonorMismatchError(f"the donor checkpoint {self.path} has tensor {key!r} of shape {shape} but "
                                         f"the recipient's {name!r} has {tuple(like.shape)}; {FINETUNED_COPY}")
        state = set(recipient.state_dict())
        extra = [k for k in self._index if k not in used and k.endswith((".weight", ".bias"))
                 and not any(k == s or s.endswith("." + k) for s in state) and not k.endswith(LEGACY_BUFFERS)]
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise DonorMismatchError(f"the donor checkpoint {self.path} has tensor {extra[0]!r}{more}, which the "
                                     f"recipient lacks (is F larger or deeper than P?); {FINETUNED_COPY}")

    def _key(self, name: str) -> str | None:
        candidates = [name] + [name[len(p):] for p in self._prefixes if name.startswith(p)]
        candidates += list(CHECKPOINT_RENAMES.get(name, ()))
        return next((k for k in candidates if k in self._index), None)

    def _tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self._key(name)
        if key is None:
            raise DonorMismatchError(
                f"the donor checkpoint {self.path} has no tensor {name!r} (nor under a known "
                "alias); this graft needs it"
            )
        with safe_open(str(self._index[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def as_donor(donor: Any) -> Donor:
    """Accept a model, a path, a tensor dict or a Donor; return a Donor."""
    if isinstance(donor, torch.nn.Module):
        return ModelDonor(donor)
    if isinstance(donor, (str, Path)) and Path(donor).exists():
        return SafetensorsDonor(donor)
    if isinstance(donor, Mapping):
        return TensorDonor(donor)
    if hasattr(donor, "params"):
        return donor
    raise DonorMismatchError(
        f"cannot use {donor!r} as a donor: pass a loaded model, a safetensors file/folder, a dict "
        "of tensors, or an object with a params(path, module) method"
    )


def pick_donor(donors: Mapping[str, Any], name: str) -> Any:
    """The donor a rule names (``"default"`` unless the rule says ``"donor": NAME``), or a
    :class:`~nngraft.errors.DonorMismatchError` saying which donors the run has and how to add one."""
    try:
        return donors[name]
    except KeyError:
        raise DonorMismatchError(
            f"a rule grafts from donor {name!r}, but this run has donors {sorted(donors)}; pass it "
            f"with donors={{{name!r}: ...}} (Grafter(P, F, tokenizer, donors=...) or Grafter.remote(..., donors=...))"
        ) from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` beside a checkpoint (used to check architectures match)."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path).parent / "config.json"
    return json.loads(file.read_text()) if file.exists() else {}
