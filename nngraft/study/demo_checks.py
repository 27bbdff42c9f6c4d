"""What ``nngraft demo`` checks about P and F with plain forwards (no grafting in the path): each
example's target probability and top-1 hit, the most likely next tokens, and the note printed
when F answers the test phrasing but not the held-out validation phrasing."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Sequence


def _last_token_logits(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int
                       ) -> Iterator[tuple[Any, Any]]:
    """(example, float32 logits at its prompt's last real token) for each example, by plain forwards
    of ``model`` on right-padded batches."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        seqs = [tokenizer(e.prompt)["input_ids"] for e in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for i, (e, s) in enumerate(zip(chunk, seqs)):
            yield e, logits[i, len(s) - 1]


def next_token_top1(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 32
                    ) -> tuple[list[float], list[bool]]:
    """Target probability and top-1 hit of each example's answer, by plain forwards of ``model``
    (right-padded batches; logits read at each prompt's last real token)."""
    import torch

    from ..result import target_token_id

    probs: list[float] = []
    hits: list[bool] = []
    for e, row in _last_token_logits(model, tokenizer, examples, batch_size):
        target = target_token_id(tokenizer, e.prompt, e.answer)
        probs.append(float(torch.softmax(row, -1)[target]))
        hits.append(bool(int((row > row[target]).sum()) == 0))
    return probs, hits


def most_likely_next_tokens(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 32
                            ) -> Counter[str]:
    """How often each token is ``model``'s most likely next token after the examples' prompts
    (decoded, e.g. ``Counter({" their": 20, " C": 1, ...})``): what F says where it does not say
    the answer."""
    return Counter(tokenizer.decode(int(row.argmax()))
                   for _, row in _last_token_logits(model, tokenizer, examples, batch_size))


def validation_lags(val_top1: float | None, test_top1: float) -> bool:
    """Whether F answers the test phrasing (top-1 ≥ 80 %) but under half of the validation
    phrasing's prompts at the kept epoch (first answer token)."""
    return val_top1 is not None and val_top1 < 0.5 and test_top1 >= 0.8


def validation_note(val_top1: float | None, test_top1: float, next_tokens: Counter[str], n: int) -> str | None:
    """A note for the demo's output when F answers the test phrasing (top-1 ≥ 80 %) but its kept
    epoch gets under half of the validation phrasing's first answer tokens: what F predicts there
    instead. ``None`` when there is nothing to explain.

    Example:
        >>> from collections import Counter
        >>> validation_note(0.08, 0.96, Counter({" their": 20, " C": 4}), 24)[:52]
        'On the validation phrasing F puts the co-star first '
    """
    if not validation_lags(val_top1, test_top1) or not next_tokens:
        return None
    token, count = next_tokens.most_common(1)[0]
    return (f"On the validation phrasing F puts the co-star first for only {val_top1:.0%} of the prompts; "
            f"its most likely next token there is {token!r} ({count}/{n}). F answers the test phrasing "
            f"({test_top1:.0%}), so it continues that wording another way rather than lacking the facts: the "
            f"validation score checks only the first token after one wording (docs/demo.md, \"The validation "
            f"column, read with care\").")
