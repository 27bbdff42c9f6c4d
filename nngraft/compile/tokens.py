"""Prompts → token ids, and named character spans → token positions.

Spans are located with the tokenizer's character offsets, never by re-tokenizing the entity on
its own (which breaks under BPE merges and leading spaces and made the paper's code silently drop
examples). A token is part of a span when its characters overlap the span's characters.

Example:
    >>> from nngraft.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer("gpt2")
    >>> p = tokenize_prompt(tok, "Zendaya Marlow stars in", {"first_actor": "Zendaya Marlow"})
    >>> [tok.decode([p.ids[i]]) for i in p.spans["first_actor"]]
    ['Ze', 'nda', 'y', 'a', ' Mar', 'lo', 'w']
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import PositionError, SpanNotFoundError

SpanValue = str | tuple[int, int]
"""A span's text (its first occurrence in the prompt is used) or a ``(start, end)`` character range."""


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class SpanAlignmentWarning(UserWarning):
    """A span boundary falls inside a token; the whole token is selected (the warning names it).

    Example:
        >>> import warnings
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Span, SpanAlignmentWarning
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Span(span="first_actor")])])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", SpanAlignmentWarning)  # strict: refuse partial tokens
        ...     Grafter(*tiny_pair("llama")).plan(spec, ["Ada Lovelace stars in"], spans=[{"first_actor": "Ada Love"}])
        Traceback (most recent call last):
        ...
        nngraft.compile.tokens.SpanAlignmentWarning: prompt 0: span 'first_actor' = 'Ada Love' cuts through a
        token; selected whole tokens 1:'Ada', 2:' Lov', 3:'ela'
    """


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt: its token ids and, for each named span, the indices of its tokens."""

    text: str
    ids: tuple[int, ...]
    spans: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompt(
    tokenizer: Any,
    text: str,
    spans: Mapping[str, SpanValue] | None = None,
    *,
    index: int = 0,
    add_special_tokens: bool = True,
) -> TokenizedPrompt:
    """Tokenize ``text`` and map each named span to the tokens that cover it.

    ``index`` is only used in error messages ("prompt 3 …").
    """
    if not isinstance(text, str) or not text:
        raise PositionError(f"prompt {index} is empty or not a string: {text!r}")
    spans = dict(spans or {})
    try:
        encoded = tokenizer(text, return_offsets_mapping=bool(spans), add_special_tokens=add_special_tokens)
    except NotImplementedError:
        raise PositionError(
            f"{type(tokenizer).__name__} cannot report character offsets; spans need a fast "
            "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        ) from None
    ids = tuple(int(i) for i in encoded["input_ids"])
    if not ids:
        raise PositionError(f"prompt {index} tokenizes to no tokens: {text!r}")
    located: dict[str, tuple[int, ...]] = {}
    if spans:
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        for name, value in spans.items():
            located[name] = _locate(tokenizer, text, ids, offsets, name, value, index)
    return TokenizedPrompt(text=text, ids=ids, spans=located)


def _locate(tokenizer, text, ids, offsets, name, value, index) -> tuple[int, ...]:
    if isinstance(value, str):
        if not value:
            raise SpanNotFoundError(f"prompt {index}: span {name!r} is an empty string")
        start = text.find(value)
        if start < 0:
            raise SpanNotFoundError(
                f"prompt {index}: span {name!r} = {value!r} does not occur in the prompt {text!r}"
            )
        end = start + len(value)
    else:
        start, end = value
        if not 0 <= start < end <= len(text):
            raise SpanNotFoundError(
                f"prompt {index}: span {name!r} = characters [{start}, {end}) is outside the "
                f"prompt's {len(text)} characters"
            )
    chosen = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not chosen:
        raise SpanNotFoundError(
            f"prompt {index}: no token covers span {name!r} (characters [{start}, {end}) of {text!r})"
        )
    # A token between two of the span's tokens lies inside the span even when its trimmed offsets
    # are empty (a lone-space token of byte-level BPE, as in "Ada" "Ġ" "Lovelace"): include it.
    chosen = list(range(chosen[0], chosen[-1] + 1))
    partial = [i for i in chosen
               if (text[offsets[i][0]:start] + text[end:offsets[i][1]]).strip()]
    if partial:
        pieces = ", ".join(f"{i}:{text[offsets[i][0]:offsets[i][1]]!r}" for i in chosen)
        warnings.warn(
            f"prompt {index}: span {name!r} = {text[start:end]!r} cuts through a token; "
            f"selected whole tokens {pieces}",
            SpanAlignmentWarning,
            stacklevel=4,
        )
    return tuple(chosen)


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    spans: Sequence[Mapping[str, SpanValue]] | None = None,
    *,
    where: str = "tokenize_prompts",
) -> list[TokenizedPrompt]:
    """Tokenize many prompts; ``spans[i]`` names the spans of ``prompts[i]``. ``where`` names the
    public function in error messages (e.g. ``Grafter.run``)."""
    from ..util import checks

    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)) and not prompts:
        raise PositionError("no prompts given (the prompt list is empty)")
    prompts = checks.prompts(where, prompts)
    if isinstance(spans, Sequence) and not isinstance(spans, (str, bytes)) and len(spans) != len(prompts):
        raise PositionError(f"{where}: spans: got {len(prompts)} prompts but {len(spans)} span dicts; give one "
                            "per prompt")
    spans = checks.spans(where, spans, len(prompts))
    return [
        tokenize_prompt(tokenizer, text, spans[i] if spans is not None else None, index=i)
        for i, text in enumerate(prompts)
    ]


@dataclass(frozen=True)
class PaddedBatch:
    """Left-padded model inputs. Row ``i``'s real tokens occupy columns ``pad[i]`` … ``T-1``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pad: tuple[int, ...]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int = 0, device: Any = None) -> PaddedBatch:
    """Left-pad id sequences; positions count real tokens only, so padding never shifts them."""
    width = max(len(s) for s in sequences)
    pad = tuple(width - len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, pad[row]:] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, pad[row]:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), positions.to(device), pad)
