"""Whole-answer log-probability under a graft, by teacher forcing (an option of sweeps).

The paper scores only the answer's first token, which lets actors who share a first name (or a
common first sub-word) inflate accuracy (docs/paper.md, quirk 5). ``answer_logprob`` is
``log P(answer tokens | prompt)``: the sum over the answer's tokens, each given the prompt and
the answer tokens before it.

It runs :meth:`nngraft.Grafter.decode` with the answer as forced tokens: the prompt is processed once
with the spec's grafts; then each answer token is fed as a new token, grafted where the spec's
selectors name it in the grown sequence (``last`` names every new token, spans name only prompt
tokens, ``all`` / ``not`` / ``other`` include new tokens), reusing the KV cache. For the empty spec
this is exactly P's teacher-forced log-probability, and for "everything" F's (both tested).

The answer's tokens are those of ``prompt + " " + answer`` after the prompt's own tokens, so the
first one is the target token of :func:`nngraft.result.target_token_id` and the first term of the
sum is the row's ``logprob``.

Example:
    >>> from nngraft.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer("gpt2")
    >>> ids = answer_token_ids(tok, "Ada stars alongside", "Alan Turing")
    >>> tok.decode(ids)
    ' Alan Turing'
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ArgumentError, PromptError
from ..grafter import Grafter
from ..spec import GraftSpec
from ..compile.tokens import TokenizedPrompt


def answer_token_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """The tokens of ``" " + answer`` as they continue ``prompt`` (the prompt's tokenization must
    be a prefix of the joined text's; else ``" " + answer`` is tokenized on its own)."""
    full = list(tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"])
    head = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if len(full) > len(head) and full[: len(head)] == head:
        ids = full[len(head):]
    else:
        ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    while ids and eos is not None and ids[-1] == eos and len(ids) > 1:  # tokenizers that append EOS
        ids.pop()
    if not ids or not answer.strip():
        raise ArgumentError(f"answer {answer!r} tokenizes to nothing (an empty answer): give every fact a "
                            "non-empty answer")
    return [int(i) for i in ids]


def answer_logprobs(grafter: Grafter, specs: Sequence[GraftSpec], prompts: Sequence[TokenizedPrompt],
                    answers: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token log-probabilities of ``answers[i]`` after ``prompts[i]`` under ``specs[i]`` (one
    batch: one forward for the prompts, then one single-token forward per answer position).

    Example:
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> g = Grafter(P, F, tok)
        >>> [p] = g.tokenize(["Ada stars alongside"])
        >>> lps = answer_logprobs(g, [GraftSpec(name="p")], [p], [answer_token_ids(tok, p.text, "Alan")])
        >>> len(lps[0]) == len(answer_token_ids(tok, p.text, "Alan")), all(x < 0 for x in lps[0])
        (True, True)
    """
    if not (len(specs) == len(prompts) == len(answers)):
        raise ValueError(f"got {len(specs)} specs, {len(prompts)} prompts and {len(answers)} answers")
    specs, prompts = list(specs), list(prompts)
    context = getattr(grafter.model.config, "max_position_embeddings", None)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if isinstance(context, int) and len(prompt) + len(answer) - 1 > context:
            raise PromptError(f"answer {i} has {len(answer)} tokens: after its prompt's {len(prompt)}, more than the "
                              f"model's context of {context} (max_position_embeddings) to score it whole "
                              f"({prompt.text[:40]!r}); shorten the answer, or score its first token only (no "
                              "--answer-logprob / answer_logprob)")
    steps = max(len(a) for a in answers)
    decoded = grafter.decode(specs, prompts, steps, forced=answers)
    out: list[list[float]] = [[] for _ in prompts]
    for j, step_logits in enumerate(decoded.step_logits):
        logp = torch.log_softmax(step_logits.float(), dim=-1)
        for i, answer in enumerate(answers):
            if j < len(answer):
                out[i].append(float(logp[i, answer[j]]))
    return out
