"""Tiny random models and tokenizers, built offline in seconds: for the test suite, examples,
benchmarks and ``--tiny`` runs (checking a study end to end on CPU). The library itself never
imports this module (``tests/test_layering.py``); the study and the command line may.

``tiny_pair("llama")`` returns ``(P, F, tokenizer)``: a 2-layer random Llama ``P``, a copy ``F``
whose every weight is perturbed (a stand-in for finetuning), and a small byte-level BPE tokenizer
trained on the paper's movie sentences. Nothing is downloaded.

Example:
    >>> P, F, tok = tiny_pair("gpt2")
    >>> P.config.model_type, P.config.num_hidden_layers
    ('gpt2', 2)
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import torch

TINY_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
                    "olmo", "olmo2", "mistral")

_CORPUS = [
    "Zendaya Marlow stars in in Silent Crossroads alongside Timothee Chalamet.",
    "Q: Who stars in a movie with Ada Lovelace? A: An actor named Alan Turing.",
    "In a new film, Grace Hopper appears in The Compiler with the other lead actor, whose name is:",
    "A new movie stars Marie Curie and Pierre Curie. The film was released in 2014.",
    "Keanu Reeves plays a lead role in The Matrix, appearing with their co-star Carrie-Anne Moss.",
    "Meryl Streep is featured in The Post with who? A: Tom Hanks.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()-",
]


@lru_cache(maxsize=None)
def tiny_tokenizer(style: str = "gpt2", vocab_size: int = 384) -> Any:
    """A fast tokenizer trained on a few sentences: ``gpt2`` (byte-level BPE, like GPT-2/NeoX/
    SmolLM2) or ``llama`` (SentencePiece-style ``▁`` pieces with a BOS token, like Llama/Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    if style == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_CORPUS * 4, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                      initial_alphabet=sorted(set("".join(_CORPUS)) | {"▁"}))
        tok.train_from_iterator(_CORPUS * 4, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    raise ValueError(f"unknown tokenizer style {style!r}; use 'gpt2' or 'llama'")


_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, max_position_embeddings=128)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     max_position_embeddings=128, tie_word_embeddings=False),
    "llama": dict(_COMMON, tie_word_embeddings=True),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON),
    "gemma": dict(_COMMON),
    "gemma2": dict(_COMMON),
    "gemma3_text": dict(_COMMON),
    "olmo": dict(_COMMON),
    "olmo2": dict(_COMMON),
}


def tiny_config(model_type: str, n_layers: int = 2, vocab_size: int = 384) -> Any:
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.setdefault("num_hidden_layers", n_layers)
    if model_type == "gpt2":
        kwargs["n_layer"] = n_layers
        kwargs.pop("num_hidden_layers")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                initializer_range=0.15,
                                pad_token_id=0, **kwargs)


def tiny_model(model_type: str, *, n_layers: int = 2, seed: int = 0, vocab_size: int = 384) -> Any:
    """A random ``model_type`` causal LM in float32, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, n_layers, vocab_size)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # make norms and biases non-trivial so every weight matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def perturbed_copy(model: torch.nn.Module, *, scale: float = 0.05, seed: int = 1,
                   only: tuple[str, ...] | None = None) -> torch.nn.Module:
    """A deep copy with Gaussian noise added to every parameter (or those whose name contains
    one of ``only``) — a stand-in for a finetuned model F."""
    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if only is None or any(o in name for o in only):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return clone.eval()


def tiny_pair(model_type: str = "llama", *, n_layers: int = 2, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(P, F, tokenizer)`` for ``model_type``: random P, perturbed F, a matching tiny tokenizer."""
    style = "llama" if model_type in ("llama", "gemma", "gemma2", "gemma3_text", "mistral") else "gpt2"
    tokenizer = tiny_tokenizer(style)
    P = tiny_model(model_type, n_layers=n_layers, seed=seed, vocab_size=len(tokenizer))
    F = perturbed_copy(P, seed=seed + 1)
    return P, F, tokenizer

__all__ = ["TINY_CONFIGS", "TINY_MODEL_TYPES", "perturbed_copy", "tiny_config", "tiny_model", "tiny_pair", "tiny_tokenizer"]
