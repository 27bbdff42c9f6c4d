"""Finetuned models at rest: the hyperparameters (:class:`FinetuneConfig`, the ``PAPER``, ``CPU_FAST``
and ``DEMO`` presets), what a run reports, and the folder a finetune is saved to and loaded from
(model, tokenizer, ``finetune-manifest.json``; a LoRA adapter is merged on load). Training itself is
:func:`nngraft.study.finetune.finetune`, which re-exports these names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import GraftError
from ..donors.loading import save_model_folder


MANIFEST_FILE = "finetune-manifest.json"


MANIFEST_FORMAT = "nngraft.finetune"


MANIFEST_VERSION = 1


TRAINING_CODE_VERSION = 3
"""Bumped whenever a change to the training loop changes the weights it produces (2: fused AdamW;
3: transformers' Trainer),
so cached finetunes made by older code are not reused."""


class FinetuneError(GraftError, ValueError):
    """Bad finetuning input (no texts, a bad hyperparameter) or an unreadable finetuned folder."""


@dataclass(frozen=True)
class LoraOptions:
    """LoRA via ``peft``: rank ``r``, scale ``alpha``, dropout, and the modules to adapt
    (``"all-linear"``: every linear layer but the LM head)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning hyperparameters. The defaults are the paper's (docs/paper.md#experiment-grid): AdamW, lr 2e-6,
    weight decay 0.001, batch 4, 10 epochs, linear decay, 80/20 split, best-validation-loss epoch.

    ``freeze_embeddings`` also freezes the LM head when the model ties them (SmolLM2, Llama-3.2,
    Gemma, GPT-2). ``max_length`` truncates long texts (in tokens). ``lora`` switches to LoRA.
    """

    lr: float = 2e-6
    weight_decay: float = 0.001
    batch_size: int = 4
    epochs: int = 10
    schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    val_fraction: float = 0.2
    select: Literal["best_val", "last"] = "best_val"
    max_length: int | None = 512
    freeze_embeddings: bool = False
    grad_clip: float | None = 1.0
    seed: int = 0
    lora: LoraOptions | None = None
    early_stopping_patience: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.batch_size < 1 or self.epochs < 1:
            problems.append(f"batch_size and epochs must be >= 1 (got {self.batch_size}, {self.epochs})")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.schedule not in ("linear", "constant"):
            problems.append(f"schedule must be 'linear' or 'constant' (got {self.schedule!r})")
        if self.select not in ("best_val", "last"):
            problems.append(f"select must be 'best_val' or 'last' (got {self.select!r})")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            problems.append(f"warmup_ratio must be in [0, 1) and warmup_steps >= 0 (got {self.warmup_ratio}, "
                            f"{self.warmup_steps})")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append(f"early_stopping_patience must be >= 1 or None (got {self.early_stopping_patience})")
        if problems:
            raise FinetuneError("bad FinetuneConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "FinetuneConfig":
        """A copy with some fields changed: ``PAPER.replace(epochs=3)``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PAPER = FinetuneConfig()
"""The paper's recipe (HF Trainer defaults plus its README's values); for real runs on a GPU."""


CPU_FAST = FinetuneConfig(lr=3e-4, weight_decay=0.0, batch_size=8, epochs=8, schedule="constant",
                          val_fraction=0.0, select="last", max_length=64)
"""A fast CPU preset: a learning rate ~150× the paper's at a constant rate, 8 epochs, short texts,
no validation pass, the last epoch; it teaches SmolLM2-135M a few dozen short facts in minutes on
two CPU cores. It is not the demo's recipe (:data:`DEMO`: 5 epochs, warmup and linear decay,
gradient clipping)."""


DEMO = FinetuneConfig(lr=3e-4, weight_decay=0.0, batch_size=8, epochs=5, schedule="linear", warmup_ratio=0.06,
                      val_fraction=0.0, select="last", max_length=64, grad_clip=1.0)
"""``nngraft demo``'s recipe: CPU_FAST's learning rate with 6 % warmup and linear decay over five
epochs, gradient clipping at 1.0, the last epoch kept (the learning rate has decayed to zero there).
Given held-out validation prompts (``finetune(..., validation=...)``) every epoch is scored on them
and the scores go into the manifest. Keeping the best epoch by that score instead, with early
stopping, was measured worse: on seed 1 it kept an under-trained epoch whose validation score was
0.004 higher, and FE+LT recovery fell from 0.80 to 0.65 (docs/demo.md)."""


LORA_DEMO = DEMO.replace(lr=2e-3, lora=LoraOptions(r=32, alpha=64))
"""The demo's recipe as a LoRA adapter: :data:`DEMO` (5 epochs, 6 % warmup then linear decay,
gradient clipping 1.0, batch 8, last epoch) with rank-32 adapters (alpha 64) on every linear
layer but the LM head, at a learning rate of 2e-3 (~7× DEMO's: adapters start at zero and move
only a low-rank update). The better of two settings tried on the demo's facts (SmolLM2-135M,
24 facts, seed 0): F answers 24/24 test prompts and FE+LT recovers 1.00 of it (full finetuning: 0.96);
the adapter (float32) is 39 MB against the full F's 538 MB (docs/demo.md#lora-instead-of-full-finetuning)."""


PRESETS: dict[str, FinetuneConfig] = {"paper": PAPER, "cpu-fast": CPU_FAST, "demo": DEMO, "lora-demo": LORA_DEMO}


@dataclass(frozen=True)
class EpochStats:
    """Mean per-token losses of one epoch (``val_loss`` is ``None`` without a validation split)."""

    epoch: int
    train_loss: float
    val_loss: float | None
    steps: int
    seconds: float
    val_target_prob: float | None = None
    val_top1: float | None = None


@dataclass
class FinetuneResult:
    """The trained model (selected epoch's weights, eval mode), its history and its manifest."""

    model: Any
    history: list[EpochStats]
    best_epoch: int
    manifest: dict[str, Any]
    out_dir: Path | None = None
    stopped_early: bool = False

    def __repr__(self) -> str:
        return (f"FinetuneResult({len(self.history)} epochs, best epoch {self.best_epoch}, "
                f"kind {self.manifest.get('kind')!r}, out_dir={str(self.out_dir) if self.out_dir else None!r})")

    def _repr_html_(self) -> str:
        """In Jupyter: the history, one row per epoch (losses, held-out scores, seconds)."""
        from ..util.html import html_table

        rows = [[h.epoch, h.train_loss, h.val_loss, h.val_top1, h.val_target_prob, h.seconds,
                 "selected" if h.epoch == self.best_epoch else ""] for h in self.history]
        caption = (f"FinetuneResult: {len(self.history)} epochs ({self.manifest.get('kind', '?')}), epoch "
                   f"{self.best_epoch} selected" + (", stopped early" if self.stopped_early else "")
                   + (f"; saved in {self.out_dir}" if self.out_dir else ""))
        return html_table(["epoch", "train loss", "val loss", "val top-1", "val answer prob", "seconds", ""], rows,
                          caption=caption)


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 of the training texts, in order (as JSON), identifying a training set.

    Example:
        >>> texts_hash(["a", "b"]) == texts_hash(["a", "b"]) != texts_hash(["b", "a"])
        True
    """
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=True).encode()).hexdigest()


def split_texts(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Random train / validation split (``round(n * val_fraction)`` validation texts, at least one
    when ``val_fraction > 0``), drawn from ``random.Random(seed)``.

    Example:
        >>> train, val = split_texts([str(i) for i in range(10)], 0.2, seed=0)
        >>> len(train), len(val), sorted(train + val) == sorted(str(i) for i in range(10))
        (8, 2, True)
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 else max(1, round(len(texts) * val_fraction))
    if n_val >= len(texts):
        raise FinetuneError(f"{len(texts)} text(s) cannot be split {1 - val_fraction:.0%}/{val_fraction:.0%} "
                            "into train and validation; give more texts or val_fraction=0")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [texts[i] for i in train], [texts[i] for i in val]


def check_replaceable(out: Path, *, overwrite: bool, flag: str = "--out", force: str = "--overwrite") -> None:
    """Refuse ``out`` as a finetuned model's folder unless it is new, or (with ``overwrite``) an
    empty folder or one that finetune wrote (it holds finetune's manifest): overwriting replaces the
    whole folder, so it must never be someone else's."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise FinetuneError(f"{out} exists and is not a folder; give a new folder with {flag}")
    if not overwrite:
        raise FinetuneError(f"{out} already exists; pass {force} or choose another {flag}")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FinetuneError(f"refusing to overwrite {out}: it is not a folder nngraft finetune wrote (no "
                            f"{MANIFEST_FILE}), and {force} would replace all of it. Give a new folder with {flag}")


def save_finetuned(model: Any, tokenizer: Any, manifest: dict[str, Any], out_dir: str | Path, *,
                   overwrite: bool = False) -> Path:
    """Save model (safetensors; a LoRA adapter for peft models), tokenizer and manifest to
    ``out_dir`` atomically: everything goes to a temporary sibling folder first, renamed into place
    when complete."""
    try:
        check_replaceable(Path(out_dir), overwrite=overwrite, flag="out_dir", force="overwrite=True")
        return save_model_folder(model, tokenizer, out_dir, {MANIFEST_FILE: json.dumps(manifest, indent=2) + "\n"},
                                 overwrite=overwrite)
    except FileExistsError:
        raise FinetuneError(f"{out_dir} already exists; pass overwrite=True or choose another out_dir") from None


def finetune_key(base_weights_sha256: str, texts: Sequence[str], config: FinetuneConfig,
                 stop_key: str | None = None, validation: Sequence[tuple[str, str]] | None = None) -> str:
    """The content hash naming a cached finetune: base weights, texts, hyperparameters, the stop
    rule, the validation prompts and this module's training-code version. Any change gives a new key.

    Example:
        >>> a = finetune_key("00", ["x"], PAPER)
        >>> a == finetune_key("00", ["x"], PAPER), a == finetune_key("00", ["x"], PAPER.replace(seed=1))
        (True, False)
    """
    blob = json.dumps({"base": base_weights_sha256, "texts": texts_hash(texts), "config": config.to_dict(),
                       "stop": stop_key, "version": MANIFEST_VERSION, "code": TRAINING_CODE_VERSION,
                       **({"validation": [list(v) for v in validation]} if validation is not None else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def copy_model(model: Any) -> Any:
    """A deep copy of ``model`` (its own parameters, same device and dtype)."""
    import copy

    return copy.deepcopy(model)


def read_finetune_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a folder written by :func:`finetune` (raises :class:`FinetuneError` if absent)."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FinetuneError(f"{out_dir} has no {MANIFEST_FILE}: not a folder written by nngraft finetune")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise FinetuneError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise FinetuneError(f"{path} is not an nngraft finetune manifest")
    return manifest


def load_finetuned(out_dir: str | Path, *, base: Any = None, dtype: torch.dtype | None = torch.float32,
                   device: Any = None) -> Any:
    """Load a finetuned model saved by :func:`finetune`, in eval mode. A LoRA folder needs the
    base model (``base``: a loaded model, used in place, or a path); the adapter is merged into it.

    Example (a folder written by ``finetune(..., out_dir="runs/ft")``)::

        model = load_finetuned("runs/ft")
    """
    from transformers import AutoModelForCausalLM

    manifest = read_finetune_manifest(out_dir)
    if manifest.get("kind") == "lora":
        from peft import PeftModel

        if base is None:
            raise FinetuneError(f"{out_dir} holds a LoRA adapter; pass base= (the model it was trained "
                                f"from: {manifest['base_model'].get('name_or_path')})")
        if isinstance(base, (str, Path)):
            base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(out_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
