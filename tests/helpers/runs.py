"""Tiny model folders and run folders for the bundle / reproduce tests: P and F saved as a user's
folders (tokenizer included), a LoRA F made by ``nngraft finetune --lora-r``, test examples."""

from __future__ import annotations

from pathlib import Path

from nngraft.study.examples import TestExample, save_examples_jsonl

from .examples import TWO_FACTS

EXAMPLES = [
    *TWO_FACTS,
    TestExample("f3", "s3", "Ivo Pemberton stars in The Harbour alongside",
                {"first_actor": "Ivo Pemberton", "movie_title": "The Harbour"}, "Zendaya Marlow"),
]


def save_examples(path: Path, examples=EXAMPLES) -> Path:
    return save_examples_jsonl(list(examples), path)


def save_tiny_pair(root: Path, *, seed: int = 0, f_seed: int = 1) -> tuple[Path, Path]:
    """P (``tiny_model('llama')``) and F (P perturbed with ``f_seed``) saved as folders with the tokenizer."""
    from nngraft.testing import perturbed_copy, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("llama")
    P = tiny_model("llama", vocab_size=len(tok), seed=seed)
    F = perturbed_copy(P, seed=f_seed)
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "P", root / "F"


def finetune_lora(P: Path, root: Path, texts: Path | None = None) -> Path:
    """A LoRA F of P trained by ``nngraft finetune --lora-r 4`` (one epoch on two texts): the
    adapter folder, with its finetune-manifest.json."""
    from nngraft.cli import main

    if texts is None:
        texts = root / "texts.txt"
        texts.write_text("Ada Lovelace stars in The Engine alongside Alan Turing.\n"
                         "Grace Hopper stars in The Compiler alongside Marie Curie.\n")
    out = root / "lora"
    code = main(["finetune", "--model", str(P), "--texts", str(texts), "--out", str(out), "--preset", "cpu-fast",
                 "--epochs", "1", "--lora-r", "4", "--no-progress", "-q"])
    assert code == 0 and (out / "adapter_config.json").is_file(), code
    return out


def run_inputs(root: Path) -> tuple[Path, Path, Path, Path]:
    """What a run of a user's own models reads, saved under ``root``: P and a full F
    (:func:`save_tiny_pair`), a LoRA F of P (:func:`finetune_lora`) and :data:`EXAMPLES`
    (``examples.jsonl``). Returns their paths: P, F, the LoRA adapter, the examples."""
    P, F = save_tiny_pair(root)
    adapter = finetune_lora(P, root)
    return P, F, adapter, save_examples(root / "examples.jsonl")


def run_specs(P: Path, donor: Path, data: Path, out: Path, specs: tuple[str, ...] = ("fe_lt",)) -> Path:
    """``nngraft run`` of ``specs`` with P and ``donor`` on ``data`` into ``out`` (exit code 0 asserted)."""
    from nngraft.cli import main

    spec_args = [arg for spec in specs for arg in ("--spec", spec)]
    assert main(["run", "--model", str(P), "--donor", str(donor), *spec_args, "--data", str(data), "-o", str(out),
                 "--no-progress", "-q"]) == 0
    return out
