"""LoRA adapters as donors: a PEFT adapter folder (or Hub repo) read natively, grafted as a
correction ``y + scale · B(A(x))`` — exactly PEFT's — here or on a remote server.

Example:
    >>> from nngraft.donors.lora import LoraDonor  # LoraDonor("path/to/adapter")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DonorMismatchError, RemoteDonorError
from .donor import PICKLE_SUFFIXES, module_params
from .shipment import (Shipment, check_dtype, check_shape, detached_copy, dtype_bytes, from_map, layout_of,
                       owner_of, to_map)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_PREFIX = "base_model.model."


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name ending in it
    (as a regular expression, at a dot boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_files(path: Path) -> tuple[Path, Path]:
    """(folder, safetensors weights file) of the LoRA adapter at ``path`` (its folder or its
    ``.safetensors`` file). Refuses pickled checkpoints before anything reads them."""
    if not path.exists():
        raise RemoteDonorError(f"no LoRA adapter at {path}: it does not exist (pass the adapter folder, "
                               "with adapter_config.json and adapter_model.safetensors)")
    if path.is_dir():
        weights = path / "adapter_model.safetensors"
        if not weights.exists():
            binary = path / "adapter_model.bin"
            if binary.exists():
                raise _pickled_adapter(binary, f"{path} has adapter_model.bin but no adapter_model.safetensors")
            raise RemoteDonorError(f"no adapter_model.safetensors in {path}")
        return path, weights
    if path.suffix in PICKLE_SUFFIXES:
        raise _pickled_adapter(path, f"{path} is a pickled checkpoint")
    if path.suffix != ".safetensors":
        raise RemoteDonorError(f"{path} is not a .safetensors file: pass the adapter folder (with "
                               "adapter_config.json and adapter_model.safetensors) or its .safetensors file")
    return path.parent, path


def _pickled_adapter(binary: Path, what: str) -> RemoteDonorError:
    """The error for a LoRA adapter saved as a pickle: how to convert it, in one line."""
    target = binary.parent / "adapter_model.safetensors"
    command = (f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
               f"{str(binary)!r}, weights_only=True), {str(target)!r})\"")
    return RemoteDonorError(
        f"{what}. nngraft never unpickles weights ({', '.join(PICKLE_SUFFIXES)} files are pickles; "
        "loading one can run code). Convert the adapter to safetensors once (torch's weights_only "
        f"loader refuses code):\n  {command}\nor, with peft: PeftModel.from_pretrained(P, "
        f"{str(binary.parent)!r}).save_pretrained(DIR, safe_serialization=True). Then pass the folder "
        f"({binary.parent}) or the .safetensors file."
    )


class LoraDonor:
    """A PEFT LoRA adapter as a donor: ``F = P + scale · B·A`` on the adapted modules.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), or
            that ``.safetensors`` file. Weights are read with safetensors; nothing is unpickled: a
            ``.bin``/``.pt``/``.pth``/``.ckpt`` adapter is refused with the one-line conversion.
        dtype: dtype ``A``/``B`` travel in (default: the remote run's ``dtype``).

    ``scale`` is ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), per module when the
    adapter has ``rank_pattern`` / ``alpha_pattern``. Modules the adapter does not touch are
    identical in F and P, so grafting them does nothing (they are skipped). ``modules_to_save``
    tensors are full finetuned tensors and travel dense. Not supported (refused with a message):
    DoRA, trained biases (``bias != "none"``, ``lora_bias``), non-LoRA PEFT methods.

    The donor is the *adapter* (PEFT's unmerged model): with tied input/output embeddings, an
    adapter on the input embedding changes only the input side, whereas ``merge_and_unload()``
    would also change the tied head. The base weights PEFT saves beside adapted embeddings
    (``base_layer``) must equal P's; this is checked wherever P's weights are at hand.

    Example (grafting the adapter equals grafting PEFT's merged model):
        >>> import copy, tempfile, torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last, LoraDonor
        >>> from nngraft.testing import tiny_pair
        >>> P, _, tok = tiny_pair("llama")
        >>> lora = get_peft_model(copy.deepcopy(P), LoraConfig(r=4, target_modules=["up_proj"], init_lora_weights=False))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     lora.save_pretrained(folder)
        ...     donor = LoraDonor(folder)
        >>> sorted(donor.factors), donor.scale("model.layers.0.mlp.up_proj")
        (['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'], 2.0)
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> torch.allclose(Grafter(P, donor, tok).run(spec, ["Ada Lovelace stars in"]).logits,
        ...                Grafter(P, lora.merge_and_unload(), tok).run(spec, ["Ada Lovelace stars in"]).logits, atol=1e-5)
        True
    """

    kind = "lora"

    def __init__(self, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
        check_dtype("LoraDonor", dtype)
        if not isinstance(path, (str, Path)):
            from ..util.checks import fail

            raise fail("LoraDonor", "path", "the adapter folder or its .safetensors file (a path)", path)
        self.path = Path(path)
        folder, weights = _adapter_files(self.path)
        config_file = folder / "adapter_config.json"
        if not config_file.exists():
            raise RemoteDonorError(f"no adapter_config.json in {folder}: a PEFT adapter folder holds it beside "
                                   "adapter_model.safetensors (peft's save_pretrained writes both); copy it there, or "
                                   "give the folder of a whole model (with config.json) as a plain donor")
        self.config = json.loads(config_file.read_text())
        self._check_config()
        self.dtype = dtype
        self.base_model = self.config.get("base_model_name_or_path")
        self.verified_bases: set[str] = set()  # recipient names the Hub confirmed as this base (renamed repositories)
        from safetensors.torch import load_file

        raw = load_file(str(weights))
        self.factors: dict[str, dict[str, torch.Tensor]] = {}  # module path -> {"A", "B"}
        self._raw_kinds: set[str] = set()  # lora_A / lora_B / lora_embedding_A / lora_embedding_B
        self.full: dict[str, torch.Tensor] = {}  # full parameter name -> tensor (modules_to_save)
        # PEFT also saves the *base* weights of adapted embeddings / heads (in case the vocabulary
        # was resized); they must equal the recipient's, which is checked where weights are known.
        self.base: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            match = _LORA_KEY.match(name)
            if match:
                self._raw_kinds.add(match["which"])
                which = "A" if match["which"].endswith("A") else "B"
                self.factors.setdefault(match["module"], {})[which] = value
            elif ".base_layer." in name:
                self.base[name.replace(".base_layer.", ".")] = value
            elif name.endswith((".weight", ".bias")):
                name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
                self.full[name] = value
            else:
                raise RemoteDonorError(f"{weights}: unrecognised adapter tensor {key!r}")
        for module, pair in self.factors.items():
            if set(pair) != {"A", "B"}:
                raise RemoteDonorError(f"{weights}: module {module!r} has lora {sorted(pair)} but not both A and B")
        self._local: dict[str, dict[str, torch.Tensor]] = {}

    def _check_config(self) -> None:
        c = self.config
        if c.get("peft_type", "LORA") != "LORA":
            raise RemoteDonorError(f"{self.path}: PEFT method {c.get('peft_type')!r} is not LoRA")
        if c.get("use_dora"):
            raise RemoteDonorError(f"{self.path}: DoRA adapters are not supported (their update is not "
                                   "a low-rank delta: it rescales each column of W)")
        if c.get("bias", "none") != "none" or c.get("lora_bias"):
            raise RemoteDonorError(f"{self.path}: adapters with trained biases (bias={c.get('bias')!r}, "
                                   f"lora_bias={c.get('lora_bias')!r}) are not supported")
        for unsupported in ("target_parameters", "trainable_token_indices", "layer_replication"):
            if c.get(unsupported):
                raise RemoteDonorError(f"{self.path}: adapter option {unsupported}={c[unsupported]!r} "
                                       "is not supported")

    def scale(self, module: str) -> float:
        """The LoRA scale of ``module``: ``alpha / r`` (rsLoRA: ``alpha / √r``)."""
        c = self.config
        r_file = int(self.factors[module]["A"].shape[0])
        r = int(_pattern_value(c.get("rank_pattern") or {}, module, c.get("r", r_file)))
        if r != r_file:
            raise RemoteDonorError(f"{self.path}: module {module!r} has rank {r_file} in the weights but "
                                   f"{r} in adapter_config.json")
        alpha = float(_pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", r)))
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def _check_factors(self, path: str, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors[path]["A"], self.factors[path]["B"]
        out, inp = to_map(module.weight, layout_of(module)).shape
        if a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise DonorMismatchError(
                f"LoRA factors of {path!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit the "
                f"recipient's {type(module).__name__} ({out} out × {inp} in); was the adapter trained on "
                "this model?"
            )
        return a, b

    def check_base(self, recipient: Any, name: str | None = None, *, error: type[DonorMismatchError] = DonorMismatchError) -> None:
        """Refuse an adapter made for another base than ``recipient`` (a LoRA only means something
        on its base): a base named by Hub id must be the recipient's Hub id (``name``, default the
        name the recipient was loaded from), and a base that is a local folder must have a config
        that computes as the recipient's. Names that cannot be compared (a local path against a
        Hub id) are not refused."""
        import os

        from .donor import check_configs, read_config

        base = self.base_model
        if not base:
            return
        if os.path.isdir(base):
            config = read_config(base)
            if config and getattr(recipient, "config", None) is not None:
                check_configs(recipient.config, config, f"the LoRA adapter {self.path}'s base model {base}")
            return
        if name is None:  # the name the recipient was loaded from: compared only if it is a Hub id too
            name = getattr(getattr(recipient, "config", None), "_name_or_path", "") or ""
            if os.path.exists(name) or "/" not in name:
                return
        if "/" not in base or name in self.verified_bases:
            return
        from ..util.hub import same_base

        if not same_base(base, name):
            raise error(
                f"the LoRA adapter {self.path} was trained on {base!r} but the recipient is {name!r}. "
                "Grafting an adapter onto another base gives meaningless numbers; if the two are the "
                "same weights under different names, edit base_model_name_or_path in adapter_config.json "
                "(renamed repositories nngraft knows: nngraft.util.hub.BASE_MODEL_ALIASES)."
            )

    def check_against(self, model: torch.nn.Module) -> None:
        """Refuse an adapter made for another base (:meth:`check_base`) or whose modules or shapes
        do not exist in ``model``."""
        from ..arch import get_module

        self.check_base(model)
        for path in list(self.factors) + [n.rpartition(".")[0] for n in self.full]:
            try:
                module = get_module(model, path)
            except AttributeError:
                raise DonorMismatchError(
                    f"the LoRA adapter {self.path} adapts module {path!r}, which {type(model).__name__} "
                    "does not have; was it trained on this architecture?"
                ) from None
            if path in self.factors:
                self._check_factors(path, module)
        for name, value in {**self.full, **self.base}.items():
            path, _, leaf = name.rpartition(".")
            try:
                like = getattr(get_module(model, path), leaf)
            except AttributeError:
                raise DonorMismatchError(f"the LoRA adapter {self.path} has a tensor for {name!r}, which "
                                         f"{type(model).__name__} does not have") from None
            check_shape(name, value, like, "adapter")
            if name in self.base:
                self._check_base(name, like)

    def _check_base(self, name: str, recipient: torch.Tensor) -> None:
        """The adapter's saved base weight must be the recipient's (skipped on meta tensors)."""
        if recipient.is_meta:
            return
        if not torch.equal(self.base[name].to(recipient.dtype), recipient.detach().cpu()):
            raise DonorMismatchError(
                f"the LoRA adapter {self.path} was saved with its own base weights for {name!r}, and they "
                "differ from the recipient's (resized vocabulary, or another base model); nngraft "
                "cannot graft such an adapter"
            )

    # -- the Donor protocol (local) ---------------------------------------------------------

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """F's parameters: P's own, plus ``scale · B·A`` on the adapted weight (as PEFT's merge)."""

        def merged(full: str, name: str, p: torch.nn.Parameter) -> torch.Tensor:
            owner_path, _, leaf = full.rpartition(".")
            value = p.detach()
            if full in self.base:
                self._check_base(full, p)
            if full in self.full:
                check_shape(full, self.full[full], p, "adapter")
                return self.full[full].to(device=p.device, dtype=p.dtype)
            if leaf == "weight" and owner_path in self.factors:
                owner, _ = owner_of(module, name)
                a, b = self._check_factors(owner_path, owner)
                delta = from_map(b.float() @ a.float(), layout_of(owner)) * self.scale(owner_path)
                value = value + delta.to(device=p.device, dtype=p.dtype)
            return value

        return module_params(self._local, path, module, merged)

    # -- shipping ---------------------------------------------------------------------------

    def shipment(self, path: str, module: torch.nn.Module, dtype: torch.dtype | None = None) -> Shipment:
        dtype = self.dtype or dtype or torch.float32
        names = [n for n, _ in module.named_parameters()]
        full = {n: self.full[f"{path}.{n}"] for n in names if f"{path}.{n}" in self.full}
        if full:
            if path in self.factors or set(full) != set(names):
                raise RemoteDonorError(f"{self.path}: module {path!r} is only partly saved in full "
                                       "(modules_to_save); nngraft cannot graft it remotely")
            for n, like in module.named_parameters():
                check_shape(f"{path}.{n}", full[n], like, "adapter")
            return Shipment("replace", {n: detached_copy(t, dtype) for n, t in full.items()})
        if path not in self.factors:
            return Shipment("skip")
        a, b = self._check_factors(path, module)
        return Shipment("correct", {"weight.A": detached_copy(a, dtype), "weight.B": detached_copy(b, dtype)},
                        {"lora_scale": self.scale(path)})

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        size = dtype_bytes(self.dtype or dtype)
        names = [f"{path}.{n}" for n, _ in module.named_parameters()]
        if any(n in self.full for n in names):
            return sum(self.full[n].numel() for n in names if n in self.full) * size
        if path not in self.factors:
            return 0
        return sum(t.numel() for t in self.factors[path].values()) * size

    def deltas(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``scale · B·A`` for the adapted weight (module layout, float32), zeros elsewhere."""
        out = {}
        for name, like in module.named_parameters():
            full = f"{path}.{name}"
            if full in self.full:
                raise RemoteDonorError(f"{self.path}: {full!r} is saved in full (modules_to_save); its "
                                       "weight change needs P's weights, which stay on the server")
            owner_path, _, leaf = full.rpartition(".")
            if leaf == "weight" and owner_path in self.factors:
                owner, _ = owner_of(module, name)
                a, b = self._check_factors(owner_path, owner)
                out[name] = from_map(b.float() @ a.float(), layout_of(owner)) * self.scale(owner_path)
            else:
                out[name] = torch.zeros(tuple(like.shape))
        return out

    def describe(self) -> str:
        c = self.config
        return (f"LoRA adapter {self.path.name} (r={c.get('r')}, alpha={c.get('lora_alpha')}"
                f"{', rsLoRA' if c.get('use_rslora') else ''}; {len(self.factors)} adapted modules)")


def _resolve_adapter(adapter_id: str, revision: str | None) -> Path:
    """The folder of the Hub adapter ``adapter_id`` at ``revision`` (downloaded into the Hub cache,
    adapter files only); an existing local folder is used as is."""
    if Path(adapter_id).is_dir():
        return Path(adapter_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter_id, revision=revision,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
    except Exception as error:
        from ..util.hub import gated_error, is_gated

        if is_gated(error):
            raise gated_error(adapter_id, "the adapter's files") from None
        raise RemoteDonorError(f"could not get the LoRA adapter {adapter_id!r}"
                               f"{f' at revision {revision!r}' if revision else ''} from the Hugging Face Hub: "
                               f"{type(error).__name__}: {error}") from None


class HubLoraDonor(LoraDonor):
    """A PEFT LoRA adapter on the Hugging Face Hub, by id: on NDIF **no weights travel**.

    Remotely the adapter id travels as nnsight's ``peft=`` environment; NDIF loads the adapter
    from the Hub into its copy of P before running the request (``_remoteable_set_env``; in place:
    each adapted module keeps P's as ``base_layer``). The graft then keeps the adapter's effect
    only at grafted cells, by zeroing the adapter's rank-r activation ``A·x`` (``lora_A``'s output)
    at every other cell: r numbers per token, the only activation a request reads per adapted
    module. ``F = P + scale·B·A`` at the grafted cells and ``P`` elsewhere — the same graft as
    :class:`LoraDonor` with the adapter's factors sent, or a dense graft of the merged weights.

    Locally (an ordinary ``Grafter``) it is a :class:`LoraDonor` of the downloaded adapter; with
    ``Grafter.remote(..., execution="local")`` the request runs the remote code path on a copy of
    P with the adapter attached, as NDIF does.

    Args:
        adapter_id: the adapter's Hub id (``org/name``). A local adapter folder works locally and
            against local stand-in servers, never on NDIF (the server cannot see it).
        revision: a branch, tag or commit. nnsight 0.8 sends no revision with ``peft=``, so NDIF
            loads the adapter's ``main``: a remote run refuses a revision that is not main's commit.
        dtype: as :class:`LoraDonor` (local runs only; nothing is sent remotely).

    Not supported from the Hub (refused; use :class:`LoraDonor` with the folder): adapters on
    embeddings, ``modules_to_save``, and grafts of part of a fused projection (GPT-2's ``c_attn``
    grafted for q without k and v), since one ``A·x`` feeds every output feature.
    """

    kind = "hub-lora"

    def __init__(self, adapter_id: str, *, revision: str | None = None, dtype: torch.dtype | None = None) -> None:
        from ..util.checks import text

        text("HubLoraDonor", "adapter_id", adapter_id)
        text("HubLoraDonor", "revision", revision, optional=True)
        self.adapter_id, self.revision = adapter_id, revision
        super().__init__(_resolve_adapter(adapter_id, revision), dtype=dtype)
        if self.full or self.base or any(key.startswith("lora_embedding") for key in self._raw_kinds):
            raise RemoteDonorError(
                f"the LoRA adapter {adapter_id!r} adapts embeddings or saves whole modules (modules_to_save); "
                "a Hub adapter can only be grafted on its linear layers. Download it and pass the folder as "
                "LoraDonor(folder): its tensors then travel with each request"
            )

    def commit(self, revision: str | None = None) -> str | None:
        """The commit ``revision`` (default: this donor's) of the adapter resolves to, from the Hub
        cache; None for a local folder."""
        if Path(self.adapter_id).is_dir():
            return None
        return _resolve_adapter(self.adapter_id, revision or self.revision).name

    def _check_factors(self, path: str, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # on a model with the adapter attached, the module P's weights live in is its base_layer
        return super()._check_factors(path, getattr(module, "base_layer", module))

    def shipment(self, path: str, module: torch.nn.Module, dtype: torch.dtype | None = None) -> Shipment:
        raise RemoteDonorError(f"a Hub LoRA donor ({self.adapter_id!r}) travels as nnsight's peft= environment, "
                               "never as tensors")

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        return 0  # the adapter travels by name: NDIF loads it from the Hub

    def describe(self) -> str:
        c = self.config
        at = f"@{self.revision}" if self.revision else ""
        return (f"Hub LoRA adapter {self.adapter_id}{at} (r={c.get('r')}, alpha={c.get('lora_alpha')}"
                f"{', rsLoRA' if c.get('use_rslora') else ''}; {len(self.factors)} adapted modules; no weights sent)")
