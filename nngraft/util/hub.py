"""The Hugging Face Hub's refusals as one clear error, and its renamed repositories.

Example:
    >>> is_gated(OSError("You are trying to access a gated repo."))
    True
    >>> same_base("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B")
    True
"""

from __future__ import annotations

import os

from ..errors import GatedModelError


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_gated(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the Hub refusing a gated repository."""
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # pragma: no cover - very old huggingface_hub
        GatedRepoError = ()  # noqa: N806
    return any(isinstance(e, GatedRepoError) or "gated repo" in str(e).lower() for e in _chain(error))


def gated_error(repo_id: str, what: str = "its config and tokenizer") -> GatedModelError:
    """The one message for a gated repository: which token, where to get access."""
    has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    try:
        from huggingface_hub import get_token

        has_token = has_token or bool(get_token())
    except Exception:  # noqa: BLE001 - no token store: as the environment says
        pass
    if has_token:
        step = ("a Hugging Face token is set, but its account has no access to this repository yet: request "
                f"access at https://huggingface.co/{repo_id} (approval can take a while), then retry")
    else:
        step = (f"accept the licence at https://huggingface.co/{repo_id}, create a read token at "
                "https://huggingface.co/settings/tokens and export HF_TOKEN=hf_... (or run `hf auth login`)")
    return GatedModelError(
        f"{repo_id!r} is a gated repository on the Hugging Face Hub, and nngraft needs {what} on this "
        f"machine (NDIF hosts the weights; your NDIF key does not grant Hub access): {step}."
    )


BASE_MODEL_ALIASES: dict[str, str] = {
    # Meta renamed the Llama 3.1 repositories (the old names redirect to the new ones)
    "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Meta-Llama-3.1-405B": "meta-llama/Llama-3.1-405B",
    "meta-llama/Meta-Llama-3.1-405B-Instruct": "meta-llama/Llama-3.1-405B-Instruct",
    # GPT-2 moved under the openai-community organisation
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
"""Old Hub name → current name, for repositories that were renamed (case-insensitive)."""

_ALIASES = {old.lower(): new.lower() for old, new in BASE_MODEL_ALIASES.items()}


def canonical_name(repo_id: str) -> str:
    """``repo_id`` under its current Hub name (lower case), by :data:`BASE_MODEL_ALIASES`."""
    name = repo_id.strip().lower()
    return _ALIASES.get(name, name)


def same_base(a: str, b: str) -> bool:
    """Whether two Hub ids name the same repository (one may be a renamed repository's old name)."""
    return canonical_name(a) == canonical_name(b)


def hub_id(repo_id: str) -> str:
    """The Hub's own spelling of ``repo_id`` (what NDIF lists; a renamed repository's current name),
    via nnsight's cache; as given when the Hub cannot be asked (offline, unknown)."""
    from nnsight.modeling.huggingface import _ID_CACHE

    if repo_id not in _ID_CACHE:
        try:
            from huggingface_hub import HfApi

            _ID_CACHE[repo_id] = HfApi().model_info(repo_id).id
        except Exception:  # noqa: BLE001 - offline or unknown: compare as given
            return repo_id
    return _ID_CACHE[repo_id]
