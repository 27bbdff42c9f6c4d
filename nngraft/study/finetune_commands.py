"""``nngraft finetune``: finetune a causal LM on a dataset's training texts (the paper's recipe or
a fast CPU preset), from built-in datasets, your own facts and templates, or ready-made texts.

Registered with :func:`nngraft.cli.registry.command` when :mod:`nngraft.study.commands` imports
this module. The training itself is :mod:`nngraft.study.finetune`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli.registry import command
from ..util.checks import seed_arg


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """examples:
  nngraft finetune --model meta-llama/Llama-3.2-1B --dataset fake_movies_real_actors --n 1000 \\
                   --out runs/sft/llama-fmra                 # the paper's recipe (needs a GPU)
  nngraft finetune --model smollm2 --dataset fake_movies_fake_actors --n 24 --families qa \\
                   --preset cpu-fast --out runs/sft/smollm2-fmfa  # minutes on a CPU
  nngraft finetune --model smollm2 --facts inventors.jsonl --templates bio.txt --out runs/sft/inventors
                   # your own facts (any fields) through your own templates ({field} per line)
  nngraft finetune --model smollm2 --texts texts.jsonl --out runs/sft/mine   # ready-made texts
The output folder holds the model (safetensors + config + tokenizer; with --lora-r the adapter),
finetune-manifest.json and the facts (facts.jsonl). The last lines printed say how to run it, with
P's folder (for 'smollm2' or a .gguf file: the cached conversion)."""
    p.add_argument("--model", required=True, help="base model P: 'smollm2', a local Hugging Face folder, a "
                   ".gguf file, or a hub id in the local cache")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the finetuned model to")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    data = p.add_argument_group("data (give --facts, or --dataset with --n, or --texts)")
    data.add_argument("--facts", metavar="FACTS.jsonl", help="facts file: one JSON object per line, any "
                      "fields (e.g. from `nngraft data make`); rendered through --templates")
    data.add_argument("--texts", metavar="FILE", help="finetune on these texts as they are: one text per line, "
                      "or JSONL with a \"text\" field (e.g. `nngraft data texts` output); with --facts too, "
                      "the facts are only saved beside the model for `nngraft run`")
    data.add_argument("--dataset", help="built-in dataset, e.g. fake_movies_real_actors")
    data.add_argument("--n", type=int, help="number of facts of --dataset")
    data.add_argument("--data-seed", type=seed_arg, default=0, help="seed of --dataset (default 0)")
    data.add_argument("--families", nargs="+", metavar="FAMILY",
                      help="training template families (default: lm qa for the built-in sets, as the paper; add "
                           "paraphrase for the demo's extra phrasings; every family of a --templates file)")
    data.add_argument("--directions", nargs="+", choices=["A2B", "B2A"],
                      help="actor orders: B2A swaps first_actor and second_actor (default: both for the "
                           "built-in sets, as the paper; A2B for a --templates file)")
    data.add_argument("--templates", metavar="SET | FILE",
                      help="training templates: a built-in set (movies, real_movies; default: the dataset's) or "
                           "a file of your own over the facts' fields: one {field} template per line, or "
                           ".json {family: [templates]}")
    data.add_argument("--validate", metavar="TEMPLATE | FILE",
                      help="score a held-out phrasing after every epoch: a test template ending where the answer "
                           "begins (e.g. '{drug} is produced by'), a named one, or a file of them; rendered over "
                           "the facts, with --answer-field as the answer (the scores go into the manifest and are "
                           "printed per epoch)")
    data.add_argument("--answer-field", default="second_actor",
                      help="fact field --validate's prompts predict (default second_actor; e.g. maker)")
    hp = p.add_argument_group("hyperparameters (default: --preset's)")
    hp.add_argument("--preset", default="paper", choices=["paper", "cpu-fast", "demo", "lora-demo"],
                    help="paper: lr 2e-6, wd 0.001, batch 4, 10 epochs, linear decay, best of an 80/20 split; "
                         "cpu-fast: lr 3e-4 constant, batch 8, 8 epochs, last epoch (fast on a CPU); "
                         "demo: nngraft demo's recipe (lr 3e-4, 6%% warmup then linear decay, gradient "
                         "clipping 1.0, batch 8, 5 epochs, last epoch); lora-demo: the demo's recipe as a "
                         "LoRA adapter (rank 32, alpha 64, every linear layer but the LM head, lr 2e-3), tried on "
                         "the demo's F: FE+LT recovery 1.00 there (full finetuning 0.96)")
    for name, kind, what in (("lr", float, "learning rate"), ("weight-decay", float, "AdamW weight decay"),
                             ("batch-size", int, "texts per step"), ("epochs", int, "epochs"),
                             ("val-fraction", float, "validation share of the texts"),
                             ("max-length", int, "truncate texts to this many tokens"),
                             ("seed", seed_arg, "training seed (split, shuffling)")):
        hp.add_argument(f"--{name}", type=kind, help=what)
    hp.add_argument("--select", choices=["best_val", "last"], help="which epoch to keep")
    hp.add_argument("--freeze-embeddings", action="store_true",
                    help="freeze the input embeddings (and a tied LM head)")
    hp.add_argument("--lora-r", type=int, help="train a LoRA adapter of this rank instead of all weights")
    hp.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 × rank)")
    p.add_argument("--device", default="auto", help="cpu, cuda … (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("finetune", _finetune_args, runs_models=True)
def _cmd_finetune(args: argparse.Namespace) -> int:
    """Finetune a causal LM on a dataset's training texts (the paper's recipe, or a fast CPU preset)."""
    from .errors import DataError
    from ..donors.loading import quiet_transformers
    from . import data as datasets
    from .finetune import PRESETS, LoraOptions

    if args.texts and args.dataset:
        raise DataError("give --texts FILE (optionally with --facts), or --facts/--dataset, not --dataset too")
    if not args.texts and bool(args.facts) == bool(args.dataset):
        raise DataError("give --facts FILE, or --dataset NAME with --n, or --texts FILE")
    if args.dataset and not args.n:
        raise DataError("--dataset needs --n (how many facts)")
    out_dir = Path(args.out)
    from .finetune import check_replaceable

    check_replaceable(out_dir, overwrite=args.overwrite)
    facts: Any = None
    source: dict[str, Any] = {}
    if args.facts:
        facts = datasets.load_facts(args.facts)
        source = {"facts": str(Path(args.facts).resolve())}
    elif args.dataset:
        facts = datasets.make_facts(args.dataset, args.n, args.data_seed)
        source = {"name": args.dataset, "n": args.n, "seed": args.data_seed}
    if args.texts:
        if args.templates or args.families or args.directions:
            raise DataError("--texts are used as they are; --templates, --families and --directions apply to "
                            "--facts/--dataset")
        texts = read_texts(args.texts)
        source["texts"] = str(Path(args.texts).resolve())
        templates: Any = None
        families: list[str] = []
        directions: list[str] = []
    else:
        templates, families, directions = training_choice(args)
        texts = datasets.training_texts(facts, families=families, directions=directions, templates=templates)
    config = PRESETS[args.preset]  # was set in the branch above only: --texts raised UnboundLocalError
    changes = {k: getattr(args, k) for k in ("lr", "weight_decay", "batch_size", "epochs", "val_fraction",
                                             "max_length", "seed", "select") if getattr(args, k) is not None}
    if args.freeze_embeddings:
        changes["freeze_embeddings"] = True
    if args.lora_r:
        changes["lora"] = LoraOptions(r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r)
    if "val_fraction" in changes and changes["val_fraction"] == 0 and "select" not in changes:
        changes["select"] = "last"
    config = config.replace(**changes)
    validation = validation_pairs(args.validate, facts, args.answer_field) if args.validate else None
    with quiet_transformers():
        return _finetune_command(args, facts, texts, config, source, templates, out_dir, families, directions,
                                 validation)


def validation_pairs(value: str, facts: Any, answer_field: str) -> list[tuple[str, str]]:
    """``--validate``'s (prompt, answer) pairs: each test template (a string, a name, or a file of
    them) rendered over ``facts``, answering with ``answer_field``."""
    from ..errors import DataError
    from .template_files import read_test_templates
    from .templates import make_test_examples, resolve_test_template

    if facts is None:
        raise DataError("--validate renders a template over facts: give --facts or --dataset (with --texts too)")
    if "{" not in value and Path(value).is_file():
        templates = read_test_templates(value)
    else:
        templates = [resolve_test_template(value)]
    return [(e.prompt, e.answer) for name, template in templates
            for e in make_test_examples(facts, template, answer_field, name=name)]


def training_choice(args: argparse.Namespace) -> tuple[Any, list[str], list[str]]:
    """(template set name or {family: templates}, families, directions) for ``nngraft finetune``."""
    from .template_files import read_training_templates
    from .templates import TRAINING_TEMPLATES

    if args.templates and args.templates not in TRAINING_TEMPLATES:
        if not Path(args.templates).exists():
            from .errors import TemplateError

            raise TemplateError(f"--templates {args.templates!r} is neither a built-in set "
                                f"({', '.join(sorted(TRAINING_TEMPLATES))}) nor a file")
        table = read_training_templates(args.templates)
        return table, list(args.families or table), list(args.directions or ["A2B"])
    templates = args.templates or ("real_movies" if args.dataset and args.dataset.startswith("real_movies")
                                   else "movies")
    return templates, list(args.families or ["lm", "qa"]), list(args.directions or ["A2B", "B2A"])


def read_texts(path: str | Path) -> list[str]:
    """Training texts from a file: JSONL with a ``"text"`` field per line (as ``nngraft data texts``
    writes), or plain text with one text per line. Blank lines are skipped.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = p.write_text("Ada Quenby built the loom engine.\\n\\nIvo Pemberton built the tide clock.\\n")
        >>> read_texts(p)
        ['Ada Quenby built the loom engine.', 'Ivo Pemberton built the tide clock.']
    """
    from .errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no texts file at {path}")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no texts")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    texts = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}, line {i}: not valid JSON ({error}); give JSONL with a \"text\" field "
                            "on every line, or plain text with one text per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}, line {i}: expected an object with a \"text\" string field")
        texts.append(row["text"])
    return texts


def _finetune_command(args: argparse.Namespace, facts: Any, texts: list[str], config: Any, source: dict[str, Any],
                      templates: Any, out_dir: Path, families: list[str], directions: list[str],
                      validation: list[tuple[str, str]] | None = None) -> int:
    from ..cli.registry import console, out
    from ..donors.loading import load_model, resolve_model
    from .pairs import resolve_device
    from . import data as datasets
    from .finetune import finetune

    base = resolve_model(args.model, console=console)
    model, tokenizer = load_model(args.model, device=resolve_device(args.device), console=console)
    what = (f"{len(facts)} facts ({', '.join(families)}; {', '.join(directions)})" if not args.texts
            else f"{args.texts}")
    console.print(f"finetuning {args.model} on {len(texts)} texts from {what} with {config}")
    training = ({"texts": source["texts"]} if args.texts else
                {"families": families, "directions": directions,
                 "templates": templates if isinstance(templates, str) else {"file": str(Path(args.templates).resolve()),
                                                                            "families": templates}})
    extra: dict[str, Any] = {"training_texts": training}
    if facts is not None:
        extra["dataset"] = {**source, "facts_sha256": datasets.facts_hash(facts)}
    if validation is not None:
        extra["validate"] = {"template": args.validate, "answer_field": args.answer_field, "n": len(validation)}
    result = finetune(model, tokenizer, texts, config=config, out_dir=out_dir, overwrite=args.overwrite,
                      progress=False if args.no_progress else console, extra_manifest=extra, validation=validation)
    if facts is not None:
        datasets.save_facts(facts, out_dir / "facts.jsonl", dataset=args.dataset, seed=args.data_seed)
    best = result.history[result.best_epoch - 1]
    if validation is not None:
        for e in result.history:
            out.print(f"epoch {e.epoch}: train loss {e.train_loss:.4f}; held-out phrasing ({len(validation)} prompts): "
                      f"top-1 {e.val_top1:.2f}, mean p(answer) {e.val_target_prob:.3f}")
    val = f", validation loss {best.val_loss:.4f}" if best.val_loss is not None else ""
    out.print(f"[green]✓[/green] wrote {out_dir} (epoch {result.best_epoch} of {len(result.history)}: "
              f"train loss {best.train_loss:.4f}{val})")
    hint = "sentence_3" if isinstance(templates, str) else "TEST_TEMPLATES.txt"
    console.print(next_steps(base.location, out_dir, hint if facts is not None else None, lora=config.lora is not None))
    return 0


def next_steps(recipient: str, out_dir: Path, template: str | None, *, lora: bool) -> str:
    """What to run after ``nngraft finetune``: P's own folder (a cached conversion for 'smollm2'
    and .gguf files) and the finetuned folder; a LoRA adapter folder is a donor as it is.
    ``template``: the test template to suggest (None: no facts were saved, suggest --data;
    ``TEST_TEMPLATES.txt``: facts of your own, whose test templates and answer field only you know).
    The commands work from any folder: specs are built-in names (``fe_lt``; ``lt`` for your own
    facts, whose spans only your test templates name).

    Example:
        >>> print(next_steps("smollm2", Path("runs/sft"), "sentence_3", lora=False).splitlines()[2])
          nngraft run --spec fe_lt --model smollm2 --donor runs/sft --facts runs/sft/facts.jsonl --template sentence_3
    """
    import shlex

    p, f = shlex.quote(str(recipient)), shlex.quote(str(out_dir))
    own = template == "TEST_TEMPLATES.txt"
    data = (f"--facts {shlex.quote(str(out_dir / 'facts.jsonl'))} --template {template}" if template else
            "--data EXAMPLES.jsonl") + (" --answer-field FIELD" if own else "")
    kind = ("a LoRA adapter: give the folder as --donor, it is grafted as a LoraDonor (F = P + B·A, "
            "exact; no merge needed)" if lora else "a full finetuned model")
    note = ("\n  (TEST_TEMPLATES.txt: your test prompts, one {field} template per line, ending where the "
            "answer begins; FIELD: the fact field they predict. `--spec lt` grafts F's weights at the last "
            "token; write specs at your templates' {fields} too: docs/specs.md)"
            if own else "")
    spec = "lt" if own else "fe_lt"
    return (f"P (the recipient) is {p}\nF (the donor) is {f} — {kind}. Next:{note}\n"
            f"  nngraft run --spec {spec} --model {p} --donor {f} {data}\n"
            f"  nngraft localize --model {p} --donor {f} {data}")
