"""Model pairs of a sweep: P, F and named donors loaded from a config entry (local folders, hub ids,
GGUF files, LoRA adapters, or tiny random models) on the device ``--device`` names
(:func:`resolve_device`, also used by the demo and ``nngraft finetune``), with the identity the
manifest records, and the Grafter that runs them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GraftError
from ..grafter import Grafter
from ..util.io import loading_model
from .provenance import donor_provenance, model_identity
from .sweep_config import ModelPair, SweepConfig


def grafter_for(pair: Any, pair_cfg: ModelPair, config: "SweepConfig") -> Grafter:
    """The Grafter of one loaded model pair on the config's backend (``local``, ``ndif``,
    ``ndif-local``)."""
    donor = pair.graft_donor or pair.donor
    options: dict[str, Any] = dict(donors=pair.donors, batch_size=config.batch_size)
    if config.backend == "local":
        return Grafter(pair.recipient, donor, pair.tokenizer, **options)
    if config.backend == "ndif-local":
        return Grafter.remote(pair.recipient, donor, pair.tokenizer, execution="local", verbose=False, **options)
    return Grafter.remote(pair_cfg.recipient, donor, pair.tokenizer, verbose=False, **options)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a CUDA device without CUDA is a clear error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GraftError(f"unknown device {name!r}; use cpu, cuda, cuda:1 … or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraftError(f"--device {name}: this torch build has no usable CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GraftError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); use --device cpu or auto (or one of "
                         "those)")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedPair:
    name: str
    recipient: torch.nn.Module
    donor: torch.nn.Module
    tokenizer: Any
    identity: dict[str, Any]
    donors: dict[str, torch.nn.Module] = field(default_factory=dict)
    graft_donor: Any = None
    """What to graft from when it is not ``donor`` itself (a LoRA adapter; ``donor`` is then P
    with the adapter merged, for the plain-F baseline check)."""


def _recorded(source: str) -> str:
    """A model's source as the manifest records it: a local path made absolute (the manifest is read
    from elsewhere, e.g. by ``nngraft reproduce``); hub ids and names as given. Loading and its error
    messages keep the path the user gave."""
    local = Path(source)
    return str(local.resolve()) if local.exists() else source


def load_pair(pair: ModelPair, config: SweepConfig | None = None) -> LoadedPair:
    """Load P, F and the tokenizer of a :class:`ModelPair` (on its device and dtype)."""
    device = resolve_device(pair.device)
    if pair.tiny:
        from ..testing import tiny_pair

        P, F, tok = tiny_pair(pair.tiny, n_layers=pair.tiny_layers)
        graft_from = None
        src_p = f"nngraft.testing.tiny_pair({pair.tiny!r}, n_layers={pair.tiny_layers}) P"
        src_f = f"nngraft.testing.tiny_pair({pair.tiny!r}, n_layers={pair.tiny_layers}) F"
        if pair.dtype in _DTYPES:
            P, F = P.to(_DTYPES[pair.dtype]), F.to(_DTYPES[pair.dtype])
    else:
        from ..donors.loading import load_model

        def resolve(value: str) -> str:
            local = config.path(value) if config is not None else Path(value)
            return str(local) if local.exists() else value

        src_p, src_f = resolve(pair.recipient), resolve(pair.donor)
        dtype = _DTYPES.get(pair.dtype, "auto")
        with loading_model(f"model {pair.name!r}: the recipient", src_p):
            P, tok = load_model(src_p, dtype=dtype)
        with loading_model(f"model {pair.name!r}: the donor", src_f):
            F, graft_from = load_donor(src_f, P, dtype=dtype)
    P, F = P.to(device).eval(), F.to(device).eval()
    identity = {"recipient": model_identity(P, _recorded(src_p)), "donor": model_identity(F, _recorded(src_f)),
                "device": str(device)}
    if graft_from is not None:
        identity["donor"]["lora_adapter"] = graft_from.describe()
    if not pair.tiny:
        identity["donor"].update(donor_provenance(src_f))  # F's finetune manifest, a LoRA adapter's fingerprint
    donors = {}
    for key, value in pair.donors.items():  # extra named donors: always paths or hub ids
        local = config.path(value) if config is not None else Path(value)
        src = str(local) if local.exists() else value
        with loading_model(f"model {pair.name!r}: donor {key!r}", src):
            donors[key], _ = load_donor(src, P, dtype=_DTYPES.get(pair.dtype, "auto"))
        donors[key] = donors[key].to(device).eval()
        identity.setdefault("donors", {})[key] = model_identity(donors[key], _recorded(src))
        identity["donors"][key].update(donor_provenance(src))
    loaded = LoadedPair(pair.name, P, F, tok, identity, donors)
    loaded.graft_donor = graft_from
    return loaded


def load_donor(name: str, recipient: torch.nn.Module, *, dtype: Any) -> tuple[torch.nn.Module, Any]:
    """``(F as a whole model, LoraDonor or None)`` for a donor name (:mod:`nngraft.donors.loading`). A PEFT
    LoRA adapter folder is grafted as a :class:`~nngraft.donors.delta.LoraDonor`; the whole model returned
    beside it is P with the adapter merged (by PEFT when installed), used for the plain-F baseline
    check, so every run compares the adapter's grafts against merged weights."""
    from ..donors.loading import ADAPTER_WEIGHTS, load_model, resolve_model

    file = Path(name)
    if file.is_file() and file.suffix == ".safetensors" and file.name not in ADAPTER_WEIGHTS:
        return model_from_safetensors(file, recipient), None  # one weights file, as Python's Grafter takes it
    source = resolve_model(name)
    if source.kind != "adapter":
        return load_model(name, dtype=dtype)[0], None
    from ..donors.delta import LoraDonor

    lora = LoraDonor(source.path)
    lora.check_against(recipient)
    return merged_lora_model(recipient, source.path), lora


def model_from_safetensors(path: str | Path, recipient: torch.nn.Module) -> torch.nn.Module:
    """F as a whole model from one ``.safetensors`` file (what ``Grafter(P, "F/model.safetensors")``
    grafts from): a copy of ``recipient`` holding the file's tensors, after the same checks against P
    (a ``config.json`` beside the file, every tensor's shape, no tensor P lacks). A tensor the file
    lacks is refused by name (a tied LM head may be missing: it reads the embedding)."""
    import copy

    from ..donors.donor import SafetensorsDonor

    donor = SafetensorsDonor(path)
    donor.check_against(recipient)
    model = copy.deepcopy(recipient)
    with torch.no_grad():
        for child_name, child in model.named_children():
            for name, value in donor.params(child_name, child).items():
                child.get_parameter(name).copy_(value)
    return model.eval()


def merged_lora_model(recipient: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """A copy of ``recipient`` with the LoRA adapter merged into its weights: with PEFT's
    ``merge_and_unload`` when PEFT is installed, else with :class:`~nngraft.donors.delta.LoraDonor`'s
    ``W + scale · B·A`` per adapted module."""
    import copy

    base = copy.deepcopy(recipient)
    try:
        from peft import PeftModel
    except ImportError:
        from ..arch import get_module
        from ..donors.delta import LoraDonor

        lora = LoraDonor(adapter)
        paths = set(lora.factors) | {n.rpartition(".")[0] for n in lora.full}
        with torch.no_grad():
            for path in paths:
                module = get_module(base, path)
                for name, value in lora.params(path, module).items():
                    owner, _, leaf = name.rpartition(".")
                    getattr(get_module(module, owner) if owner else module, leaf).copy_(value)
        return base.eval()
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
