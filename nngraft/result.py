"""What a graft run returns: next-token logits per prompt, with target-token helpers.

Example:
    >>> import torch
    >>> from nngraft.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer("gpt2")
    >>> r = GraftResult(logits=torch.zeros(1, len(tok)), prompts=["Ada stars"], tokenizer=tok)
    >>> round(float(r.target_prob("Alan")[0]) * len(tok), 3)
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


def target_token_id(tokenizer: Any, prompt: str, target: str, *, space: bool = True) -> int:
    """The first token of ``target`` as it continues ``prompt`` (the paper's first-token target).

    Tokenizes ``prompt + " " + target`` and takes the first token after the prompt's own tokens,
    so the answer is scored as the model would actually produce it (a leading space becomes part
    of the token for BPE, or a ``▁`` piece for SentencePiece). Falls back to the first token of
    ``" " + target`` alone when the prompt's tokens change at the boundary.
    """
    joined = prompt + (" " if space else "") + target
    full = tokenizer(joined, add_special_tokens=True)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(full) > len(head) and list(full[: len(head)]) == list(head):
        return int(full[len(head)])
    alone = tokenizer((" " if space else "") + target, add_special_tokens=False)["input_ids"]
    if not alone:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return int(alone[0])


@dataclass
class GraftResult:
    """Next-token logits (at each prompt's last real token) of one graft run.

    ``logits[i]`` belongs to ``prompts[i]`` (run under ``spec_names[i]``). ``all_logits`` holds
    every position's logits (real tokens only) when the run asked for them."""

    logits: torch.Tensor
    prompts: Sequence[str]
    tokenizer: Any = None
    spec_names: Sequence[str] = ()
    all_logits: list[torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)

    def target_ids(self, targets: str | Sequence[str]) -> torch.Tensor:
        """Target token ids, one per prompt (a single string applies to every prompt)."""
        if isinstance(targets, str):
            targets = [targets] * len(self)
        if len(targets) != len(self):
            raise ValueError(f"{len(targets)} targets for {len(self)} prompts")
        if self.tokenizer is None:
            raise ValueError("this result has no tokenizer; pass token ids to target_prob_ids")
        return torch.tensor([target_token_id(self.tokenizer, p, t) for p, t in zip(self.prompts, targets)])

    def target_prob(self, targets: str | Sequence[str]) -> torch.Tensor:
        """Probability of each prompt's target's first token."""
        return self.probs.gather(1, self.target_ids(targets)[:, None].to(self.logits.device))[:, 0].cpu()

    def target_rank(self, targets: str | Sequence[str]) -> torch.Tensor:
        """0-based rank of each target token (number of tokens with strictly higher logit)."""
        ids = self.target_ids(targets).to(self.logits.device)
        chosen = self.logits.gather(1, ids[:, None])
        return (self.logits > chosen).sum(dim=1).cpu()

    def top_tokens(self, k: int = 5) -> list[list[str]]:
        """The ``k`` most likely next tokens per prompt, decoded."""
        top = self.logits.topk(k, dim=-1).indices.tolist()
        return [[self.tokenizer.decode([i]) for i in row] for row in top]
