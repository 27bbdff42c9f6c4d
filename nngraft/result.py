"""What a graft run returns: next-token logits per prompt, with target-token helpers and the
metrics a researcher reads next to probability: logit difference and KL divergence.

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

from .util.checks import fail


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


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, in nats, between the next-token distributions softmax(logits_p) and
    softmax(logits_q) (both (batch, vocab); computed in float32 from log-softmax, so a token
    with underflowing probability contributes exactly 0 · log 0 = 0).

    Example:
        >>> p = torch.log(torch.tensor([[0.5, 0.5]])); q = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> round(float(kl_divergence(p, q)[0]), 6)  # 0.5 ln 2 + 0.5 ln(2/3)
        0.143841
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"KL needs logits of one shape, got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    logp = torch.log_softmax(logits_p.detach().float().cpu(), dim=-1)
    logq = torch.log_softmax(logits_q.detach().float().cpu(), dim=-1)
    for name, logs in (("p", logp), ("q", logq)):
        bad = torch.isnan(logs).any(-1).nonzero().flatten().tolist()
        if bad:  # NaN logits, or a row whose every logit is -inf
            raise ValueError(f"KL: row {bad[0]} of {name}'s logits is not a distribution (NaN logits, or every "
                             "logit -inf)")
    p = logp.exp()
    # p·(log p − log q), with 0·log(0/q) = 0 where p has no mass (a -inf logit: kl_div gives NaN there)
    # and +inf where q has none but p has some
    return torch.where(p > 0, p * (logp - logq), torch.zeros(())).sum(-1)


def top_other_token(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the most likely token other than the target (the foil "P's top token": when P's
    top token is the target itself, its runner-up)."""
    masked = logits.detach().float().cpu().clone()
    masked.scatter_(1, target_ids.reshape(-1, 1).cpu(), float("-inf"))
    return masked.argmax(-1)


def logit_difference(logits: torch.Tensor, target_ids: torch.Tensor, foil_ids: torch.Tensor) -> torch.Tensor:
    """``logit[target] − logit[foil]`` per row (float32)."""
    chosen = logits.detach().float().cpu()
    return (chosen.gather(1, target_ids.reshape(-1, 1).cpu()) - chosen.gather(1, foil_ids.reshape(-1, 1).cpu()))[:, 0]


@dataclass
class GraftResult:
    """Next-token logits (at each prompt's last real token) of one graft run.

    ``logits[i]`` belongs to ``prompts[i]`` (run under ``spec_names[i]``). ``all_logits`` holds
    every position's logits (real tokens only) when the run asked for them.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> g, prompts = Grafter(*tiny_pair("llama")), ["Ada Lovelace stars in", "Grace Hopper stars in"]
        >>> out = g.run(GraftSpec(name="lt", rules=[GraftRule(components=["all"], positions=[Last()])]), prompts)
        >>> out
        GraftResult(logits=(2, 336), specs=['lt'], prompts=['Ada Lovelace stars in', 'Grace Hopper stars in'])
        >>> out.target_prob("Alan").shape, out.target_rank(["Alan", "Marie"]).shape
        (torch.Size([2]), torch.Size([2]))
        >>> p = g.run(GraftSpec(name="P"), prompts)  # no rules: plain P
        >>> out.logit_diff("Alan", baseline=p).shape, bool((out.kl_divergence(p) > 0).all())
        (torch.Size([2]), True)
    """

    logits: torch.Tensor
    prompts: Sequence[str]
    tokenizer: Any = None
    spec_names: Sequence[str] = ()
    all_logits: list[torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def __repr__(self) -> str:
        """Short: the logits' shape, the specs run, the first prompts (never the tensors).

        Example:
            >>> GraftResult(logits=torch.zeros(2, 50), prompts=["Ada stars in", "Alan stars in"],
            ...             spec_names=["fe_lt", "fe_lt"])
            GraftResult(logits=(2, 50), specs=['fe_lt'], prompts=['Ada stars in', 'Alan stars in'])
        """
        specs = list(dict.fromkeys(self.spec_names))
        prompts = [p if len(p) <= 40 else p[:37] + "..." for p in list(self.prompts)[:3]]
        more = f" (+{len(self.prompts) - 3} more)" if len(self.prompts) > 3 else ""
        extra = ", all_logits=yes" if self.all_logits is not None else ""
        return (f"GraftResult(logits={tuple(self.logits.shape)}, specs={specs}, prompts={prompts}{more}"
                f"{extra})")

    def _repr_html_(self) -> str:
        """In Jupyter: one row per prompt (spec, prompt, the top tokens with their probabilities).

        Example:
            >>> from nngraft.testing import tiny_tokenizer
            >>> tok = tiny_tokenizer("gpt2")
            >>> html = GraftResult(torch.zeros(1, len(tok)), ["<b>Ada</b> stars"], tok, ["fe_lt"])._repr_html_()
            >>> "&lt;b&gt;Ada&lt;/b&gt; stars" in html and "<b>Ada" not in html
            True
        """
        from .util.html import html_table, short

        top = self.probs.topk(min(3, self.logits.shape[-1]), dim=-1)
        names = list(self.spec_names) or [""] * len(self)
        rows = []
        for i, prompt in enumerate(self.prompts):
            tokens = [self.tokenizer.decode([int(t)]) if self.tokenizer is not None else str(int(t))
                      for t in top.indices[i]]
            best = ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(tokens, top.values[i]))
            rows.append([i, names[i] if i < len(names) else "", short(prompt), best])
        specs = list(dict.fromkeys(self.spec_names))
        caption = (f"GraftResult: {len(self)} prompts, vocabulary {self.logits.shape[-1]}"
                   + (f", specs {', '.join(specs)}" if specs else ""))
        return html_table(["#", "spec", "prompt", "top tokens (probability)"], rows, caption=caption)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)

    def target_ids(self, targets: str | Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Target token ids, one per prompt: from answer strings (a single string applies to every
        prompt; needs the tokenizer) or given as token ids already (ints or a tensor)."""
        return self._ids(targets, "targets")

    def _ids(self, targets: Any, name: str) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):
            targets = targets.reshape(-1).tolist()
        if isinstance(targets, str):
            targets = [targets] * len(self)
        if len(targets) != len(self):
            raise ValueError(f"{len(targets)} {name} for {len(self)} prompts")
        for i, t in enumerate(targets):  # an empty answer would score the bare space token
            if isinstance(t, str) and not t.strip():
                raise fail("GraftResult", f"{name}[{i}]", "a non-empty answer", t)
        if all(isinstance(t, int) for t in targets):
            return torch.tensor([int(t) for t in targets])
        if self.tokenizer is None:
            raise ValueError("this result has no tokenizer to turn answer strings into token ids; pass token "
                             "ids instead, e.g. result.target_prob([id_1, id_2, ...]) (one per prompt)")
        return torch.tensor([target_token_id(self.tokenizer, p, t) for p, t in zip(self.prompts, targets)])

    def target_prob(self, targets: str | Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Probability of each prompt's target's first token (answer strings or token ids)."""
        return self.probs.gather(1, self.target_ids(targets)[:, None].to(self.logits.device))[:, 0].cpu()

    def target_rank(self, targets: str | Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """0-based rank of each target token (number of tokens with strictly higher logit)."""
        ids = self.target_ids(targets).to(self.logits.device)
        chosen = self.logits.gather(1, ids[:, None])
        return (self.logits > chosen).sum(dim=1).cpu()

    def top_tokens(self, k: int = 5) -> list[list[str]]:
        """The ``k`` most likely next tokens per prompt, decoded."""
        top = self.logits.topk(k, dim=-1).indices.tolist()
        return [[self.tokenizer.decode([i]) for i in row] for row in top]

    def logit_diff(self, targets: str | Sequence[str], foils: str | Sequence[str] | None = None, *,
                   baseline: "GraftResult | None" = None) -> torch.Tensor:
        """Per prompt, the target's logit minus the foil's: a named ``foils`` answer (its first
        token, as for targets), or — with ``baseline`` (P's run on the same prompts) — P's most
        likely token other than the target.

        Example: ``fe.logit_diff("Alan", baseline=p)`` or ``fe.logit_diff("Alan", "Grace")``."""
        ids = self.target_ids(targets)
        if foils is not None:
            foil_ids = self._ids(foils, "foils")
        elif baseline is not None:
            if baseline.logits.shape != self.logits.shape:
                raise ValueError(f"baseline has logits of shape {tuple(baseline.logits.shape)}, this result "
                                 f"{tuple(self.logits.shape)}; run P on the same prompts")
            foil_ids = top_other_token(baseline.logits, ids)
        else:
            raise ValueError("logit_diff needs foils= (answers to compare with) or baseline= (P's result on "
                             "the same prompts, whose top other token is the foil)")
        return logit_difference(self.logits, ids, foil_ids)

    def kl_divergence(self, other: "GraftResult") -> torch.Tensor:
        """KL(self ‖ other) per prompt over the next-token distribution, in nats. For the paper's
        questions: ``f.kl_divergence(graft)`` is KL(F ‖ graft) (how far the graft is from F),
        ``graft.kl_divergence(p)`` is KL(graft ‖ P) (how far it moved from P)."""
        return kl_divergence(self.logits, other.logits)


@dataclass
class GenerationResult:
    """Continuations under a graft: the new (or forced) token ids, their text, and each step's
    logits (``step_logits[j]`` is the distribution token ``j`` was chosen from).

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["all"], positions=[Last()])])
        >>> out = Grafter(*tiny_pair("llama")).generate(spec, ["Ada Lovelace stars in"], max_new_tokens=3)
        >>> tuple(out.tokens.shape), len(out.step_logits), tuple(out.step_logits[0].shape), type(out.texts[0])
        ((1, 3), 3, (1, 336), <class 'str'>)
    """

    tokens: torch.Tensor  # (batch, new_tokens)
    texts: list[str]
    step_logits: list[torch.Tensor]  # one (batch, vocab) tensor per new token

    def __repr__(self) -> str:
        """Short: how many rows and new tokens, and the first texts (never the logits).

        Example:
            >>> GenerationResult(torch.zeros(2, 3, dtype=torch.long), [" Alan Turing", " Grace"],
            ...                  [torch.zeros(2, 50)] * 3)
            GenerationResult(2 rows × 3 new tokens, texts=[' Alan Turing', ' Grace'], step_logits: 3 × (2, 50))
        """
        texts = [t if len(t) <= 40 else t[:37] + "..." for t in self.texts[:3]]
        more = f" (+{len(self.texts) - 3} more)" if len(self.texts) > 3 else ""
        shape = f"{len(self.step_logits)} × {tuple(self.step_logits[0].shape)}" if self.step_logits else "none"
        return (f"GenerationResult({int(self.tokens.shape[0])} rows × {int(self.tokens.shape[-1])} new tokens, "
                f"texts={texts}{more}, step_logits: {shape})")

    def _repr_html_(self) -> str:
        """In Jupyter: one row per prompt, its continuation and the new token ids."""
        from .util.html import html_table, short

        rows = [[i, short(text, 80), " ".join(str(int(t)) for t in self.tokens[i][:16])
                 + (" …" if self.tokens.shape[-1] > 16 else "")] for i, text in enumerate(self.texts)]
        return html_table(["#", "continuation", "token ids"], rows,
                          caption=f"GenerationResult: {int(self.tokens.shape[0])} rows × "
                                  f"{int(self.tokens.shape[-1])} new tokens")


class GridResult(dict):
    """What :meth:`~nngraft.grafter.Grafter.run_grid` returns: ``{spec name: GraftResult}`` (a
    plain dict), shown in Jupyter as a table of each spec's top token per prompt, with
    :meth:`target_probs` for the table of answer probabilities.

    Example:
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> lt = GraftSpec(name="lt", rules=[GraftRule(components=["all"], positions=[Last()])])
        >>> grid = Grafter(*tiny_pair("llama")).run_grid([GraftSpec(name="P"), lt], ["Ada stars in", "Grace stars in"])
        >>> grid["lt"]
        GraftResult(logits=(2, 336), specs=['lt'], prompts=['Ada stars in', 'Grace stars in'])
        >>> {name: len(probs) for name, probs in grid.target_probs("Alan").items()}
        {'P': 2, 'lt': 2}
    """

    def target_probs(self, targets: str | Sequence[str] | Sequence[int] | torch.Tensor) -> dict[str, list[float]]:
        """``{spec: [probability of each prompt's target]}`` (answer strings or token ids)."""
        return {name: [float(p) for p in result.target_prob(targets)] for name, result in self.items()}

    def _repr_html_(self) -> str:
        """Specs down, prompts across (the first six), each cell the top token and its probability."""
        from .util.html import html_table, short

        if not self:
            return html_table(["spec"], [], caption="GridResult: no specs")
        first = next(iter(self.values()))
        shown = list(first.prompts)[:6]
        rows = []
        for name, result in self.items():
            top = result.probs.max(dim=-1)
            cells = [f"{result.tokenizer.decode([int(t)]) if result.tokenizer is not None else int(t)!r} {float(p):.3f}"
                     for t, p in zip(top.indices[:6], top.values[:6])]
            rows.append([name, *cells])
        more = f" (first {len(shown)} shown)" if len(first.prompts) > len(shown) else ""
        return html_table(["spec", *[short(p, 30) for p in shown]], rows,
                          caption=f"GridResult: {len(self)} specs × {len(first.prompts)} prompts{more}: top token "
                                  "(probability)")
