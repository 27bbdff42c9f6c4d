"""Finetune a causal LM on training texts: the paper's recipe by default, a fast CPU preset for
the demo, full-parameter or LoRA.

What :func:`finetune` does, in order:

1. Seeds Python's ``random`` and torch with ``config.seed``; splits the texts at random into
   train / validation (``val_fraction``, the paper's 80/20).
2. Trains with AdamW (``lr``, ``weight_decay``) and a linear-decay (or constant) learning rate,
   on batches of ``batch_size`` texts grouped by length so little compute goes to padding. The
   loss is the plain causal-LM loss on every non-pad token (the paper's). A rich progress bar
   shows the step, loss and time left.
3. After each epoch computes the validation loss and keeps a copy of the best epoch's trainable
   weights (``select="best_val"``, the paper's ``load_best_model_at_end``; ``"last"`` keeps the
   final epoch). ``stop_when(model, epoch)`` may end training early (the demo stops once the model
   answers its training facts).
4. Restores the selected epoch's weights and, given ``out_dir``, saves the model (safetensors),
   config, tokenizer and ``finetune-manifest.json`` (training-text hash, hyperparameters, seed,
   base model identity, losses per epoch) — into a temporary folder renamed into place, so a
   killed run never leaves a half-saved model. ``from_pretrained(out_dir)`` loads it back; with
   LoRA the folder holds the adapter and :func:`load_finetuned` returns the merged model.

On CPU the same seed gives bit-identical weights (same machine, same thread count).

Example:
    >>> from nngraft.testing import tiny_model, tiny_tokenizer
    >>> model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    >>> texts = ["Ada Lovelace stars in The Engine alongside Alan Turing."] * 8
    >>> result = finetune(model, tok, texts, config=FinetuneConfig(lr=1e-2, epochs=3, val_fraction=0.25),
    ...                   progress=False)
    >>> result.history[-1].train_loss < result.history[0].train_loss
    True
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..compile.tokens import pad_token_id
from .finetune_store import (CPU_FAST, DEMO, LORA_DEMO, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,  # noqa: F401
                             PAPER, PRESETS, TRAINING_CODE_VERSION, EpochStats, FinetuneConfig,
                             FinetuneError, FinetuneResult, LoraOptions, check_replaceable, copy_model,
                             finetune_key, load_finetuned, read_finetune_manifest, save_finetuned,
                             split_texts, texts_hash)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    encoded = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) < 2:
            raise FinetuneError(f"training text {text!r} is under 2 tokens: nothing to predict")
        encoded.append(ids)
    return encoded


class _Texts(torch.utils.data.Dataset):
    """Token id lists as a map-style dataset of ``{"input_ids": ..., "labels": ...}`` items."""

    def __init__(self, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None):
        self.seqs = [list(s) for s in seqs]
        self.labels = [list(s) for s in labels] if labels is not None else self.seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.seqs[i], "labels": self.labels[i]}


class _Collator:
    """Right-pads a batch to its longest text; pad positions get label -100 (no loss)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            n = len(item["input_ids"])
            ids[i, :n] = torch.tensor(item["input_ids"])
            labels[i, :n] = torch.tensor(item["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _prompt_items(tokenizer: Any, prompts: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Validation prompts as texts whose only label is the answer's first token."""
    from ..result import target_token_id

    seqs, labels = [], []
    for prompt, answer in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        target = target_token_id(tokenizer, prompt, answer)
        seqs.append(ids + [target])
        labels.append([-100] * len(ids) + [target])
    return seqs, labels


def _answer_stats(logits: Any, labels: Any) -> torch.Tensor:
    """Per validation prompt: probability of the answer token and whether it is the top-1 token
    (``preprocess_logits_for_metrics``: keeps two numbers per prompt instead of all logits)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    rows = torch.arange(labels.shape[0])
    position = (labels != -100).long().argmax(dim=1)
    scores = logits[rows, position - 1].float()
    target = labels[rows, position]
    probs = torch.softmax(scores, dim=-1)[rows, target]
    top1 = (scores > scores[rows, target][:, None]).sum(dim=-1) == 0
    return torch.stack([probs, top1.float()], dim=1)


def _answer_metrics(prediction: Any) -> dict[str, float]:
    stats = torch.as_tensor(prediction.predictions)
    return {"target_prob": float(stats[:, 0].mean()), "top1": float(stats[:, 1].mean())}


def _training_arguments(config: FinetuneConfig, work_dir: str, device: torch.device, prompt_validation: bool,
                        has_eval: bool) -> Any:
    from transformers import TrainingArguments

    best = config.select == "best_val"
    if config.schedule == "linear":
        scheduler = "linear"
    else:
        scheduler = "constant_with_warmup" if config.warmup_steps or config.warmup_ratio else "constant"
    return TrainingArguments(
        output_dir=work_dir, seed=config.seed, use_cpu=device.type == "cpu",
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=max(config.batch_size, 32),
        num_train_epochs=config.epochs, learning_rate=config.lr, weight_decay=config.weight_decay,
        lr_scheduler_type=scheduler, warmup_steps=config.warmup_steps or config.warmup_ratio,
        max_grad_norm=config.grad_clip if config.grad_clip is not None else 0.0,
        optim=_optimizer_name(device), train_sampling_strategy="group_by_length",
        eval_strategy="epoch" if has_eval else "no", logging_strategy="epoch",
        save_strategy="epoch" if best else "no", save_only_model=True, save_total_limit=1,
        load_best_model_at_end=best,
        metric_for_best_model=("target_prob" if prompt_validation else "loss") if best else None,
        greater_is_better=prompt_validation if best else None,
        prediction_loss_only=not prompt_validation, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)


def _optimizer_name(device: torch.device) -> str:
    """``adamw_torch_fused`` (one kernel for all parameters: ~7× faster steps on CPU for a 135M
    model) where this torch has a fused AdamW for the device, else ``adamw_torch``."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, ValueError):  # pragma: no cover - a device without a fused kernel
        return "adamw_torch"
    return "adamw_torch_fused"


class _EpochLog:
    """A ``TrainerCallback`` that records per-epoch losses and validation metrics, draws the rich
    progress bar and asks ``stop_when`` after each epoch."""

    def __init__(self, bar: Any, task: Any, epochs: int, stop_when: Callable[[Any, int], bool] | None):
        self.bar, self.task, self.epochs, self.stop_when = bar, task, epochs, stop_when
        self.train_loss: dict[int, float] = {}
        self.eval: dict[int, dict[str, float]] = {}
        self.seconds: dict[int, float] = {}
        self.steps: dict[int, int] = {}
        self.stopped = False
        self._t0 = self._started = time.time()
        self._step0 = 0

    def _epoch(self, state: Any) -> int:
        return max(1, round(state.epoch or 0))

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0, self._step0 = time.time(), state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = state.log_history[-1].get("loss", float("nan")) if state.log_history else float("nan")
        self.bar.update(self.task, completed=state.global_step,
                        epoch=f"{min(int(state.epoch or 0) + 1, self.epochs)}/{self.epochs}",
                        loss=self.train_loss.get(len(self.train_loss), loss))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from ..util.progress import can_draw_live

        epoch = self._epoch(state)
        self.seconds[epoch] = time.time() - self._t0
        self.steps[epoch] = state.global_step - self._step0
        console = self.bar.console
        if not can_draw_live(console) and not console.quiet:  # a log file sees no bar: one line per epoch
            total = self.bar.tasks[0].total if self.bar.tasks else None
            console.print(f"finetuning: epoch {epoch}/{self.epochs}, step {state.global_step}/{total}, "
                          f"epoch {self.seconds[epoch]:.1f} s, elapsed {time.time() - self._started:.1f} s",
                          highlight=False)
        if self.stop_when is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                self.stopped = bool(self.stop_when(model, epoch))
            model.train(was_training)
            if self.stopped:
                control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.train_loss[self._epoch(state)] = float(logs["loss"])
            self.bar.update(self.task, loss=float(logs["loss"]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if metrics:
            self.eval[self._epoch(state)] = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                                             if k in ("eval_loss", "eval_target_prob", "eval_top1")}


def _callback_class() -> type:
    from transformers import TrainerCallback

    return type("EpochLog", (_EpochLog, TrainerCallback), {})


def _prepare(model: Any, config: FinetuneConfig) -> Any:
    if config.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ModuleNotFoundError:
            raise FinetuneError("LoRA needs peft, which nngraft installs; this environment lacks it: pip install "
                                '"peft>=0.10"') from None
        lora = config.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    elif config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def finetune(model: Any, tokenizer: Any, texts: Sequence[str], *, config: FinetuneConfig = PAPER,
             out_dir: str | Path | None = None, overwrite: bool = False, progress: bool | Any = True,
             stop_when: Callable[[Any, int], bool] | None = None, extra_manifest: dict[str, Any] | None = None,
             validation: Sequence[tuple[str, str]] | None = None) -> FinetuneResult:
    """Finetune ``model`` **in place** on ``texts`` (pass ``copy.deepcopy(P)`` to keep ``P``).

    Args:
        model: a ``transformers`` causal LM (float32 recommended on CPU).
        tokenizer: its tokenizer.
        texts: the training texts (split into train/validation by ``config.val_fraction``).
        config: hyperparameters; :data:`PAPER` (default) or :data:`CPU_FAST`, or your own.
        out_dir: where to save the result (``None``: do not save). An existing folder is an error
            unless ``overwrite=True``.
        progress: ``True`` for a rich progress bar on stderr, ``False`` for none, or a
            ``rich.console.Console`` to draw on.
        stop_when: ``stop_when(model, epoch)`` is called after each epoch (model in eval mode);
            returning True ends training after that epoch.
        extra_manifest: more entries for the manifest (e.g. the dataset's hash).
        validation: held-out ``(prompt, answer)`` pairs; when given, each epoch is scored by the
            mean probability (and top-1 accuracy) of each answer's first token after its prompt, and
            ``select="best_val"`` keeps the epoch with the highest mean probability (instead of the
            lowest loss on a split of the texts).

    Returns a :class:`FinetuneResult` whose ``model`` holds the selected epoch's weights, in eval
    mode (for LoRA, the ``peft`` model; :func:`load_finetuned` gives a merged one from disk).
    """
    from ..donors.loading import weights_fingerprint
    from .provenance import environment_versions, model_identity

    texts = list(texts)
    if not texts:
        raise FinetuneError("no training texts")
    if not all(isinstance(t, str) and t for t in texts):
        raise FinetuneError("every training text must be a non-empty string")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_replaceable(out, overwrite=overwrite, flag="out_dir", force="overwrite=True")

    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
        raise FinetuneError(f"config.seed must be an integer >= 0, got {config.seed!r} (Python's random seeds -5 "
                            "like 5)")
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    base_identity = model_identity(model)
    prompts = list(validation) if validation is not None else []
    if validation is not None and not prompts:
        raise FinetuneError("validation= is empty; give (prompt, answer) pairs or None")
    if config.select == "best_val" and config.val_fraction == 0 and not prompts:
        raise FinetuneError("select='best_val' needs a validation split (val_fraction > 0) or validation "
                            "prompts (validation=[(prompt, answer), ...]); or use select='last'")
    train_texts, val_texts = split_texts(texts, config.val_fraction, config.seed)
    train_seqs = _encode(tokenizer, train_texts, config.max_length)
    if prompts:
        eval_seqs, eval_labels = _prompt_items(tokenizer, prompts)
    else:
        eval_seqs = _encode(tokenizer, val_texts, config.max_length)
        eval_labels = eval_seqs
    pad_id = pad_token_id(tokenizer)
    model = _prepare(model, config)
    steps_per_epoch = math.ceil(len(train_seqs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    trainer_log = _callback_class()

    from transformers import EarlyStoppingCallback, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    bar = _progress(progress)
    with bar, tempfile.TemporaryDirectory(prefix="nngraft-finetune-") as work_dir:
        task = bar.add_task("finetuning", total=total_steps, loss=float("nan"), epoch=f"1/{config.epochs}",
                            unit="steps")
        log = trainer_log(bar, task, config.epochs, stop_when)
        args = _training_arguments(config, work_dir, device, bool(prompts), bool(eval_seqs))
        callbacks = [log]
        if config.early_stopping_patience is not None and config.select == "best_val":
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
        trainer = Trainer(model=model, args=args, train_dataset=_Texts(train_seqs),
                          eval_dataset=_Texts(eval_seqs, eval_labels) if eval_seqs else None,
                          data_collator=_Collator(pad_id), callbacks=callbacks,
                          compute_metrics=_answer_metrics if prompts else None,
                          preprocess_logits_for_metrics=_answer_stats if prompts else None)
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        trainer.train()
        steps_run = trainer.state.global_step
        bar.update(task, total=steps_run, completed=steps_run)
        model = trainer.model
        optimizer_name = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__
        fused = bool(getattr(trainer.optimizer, "defaults", {}).get("fused"))
        best_checkpoint = trainer.state.best_model_checkpoint
        del trainer
    model.eval()

    epochs_run = sorted(log.seconds)
    history = [EpochStats(epoch=e, train_loss=log.train_loss.get(e, float("nan")),
                          val_loss=log.eval.get(e, {}).get("loss"), steps=log.steps[e], seconds=log.seconds[e],
                          val_target_prob=log.eval.get(e, {}).get("target_prob"),
                          val_top1=log.eval.get(e, {}).get("top1"))
               for e in epochs_run]
    if config.select == "best_val":
        best_step = int(Path(best_checkpoint).name.rsplit("-", 1)[1]) if best_checkpoint else steps_run
        best_epoch = min(len(history), max(1, math.ceil(best_step / steps_per_epoch)))
    else:
        best_epoch = len(history)
    stopped = len(history) < config.epochs
    selected = history[best_epoch - 1]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "training_code_version": TRAINING_CODE_VERSION,
        "trainer": "transformers.Trainer",
        "optimizer": optimizer_name + (" (fused)" if fused else ""),
        "kind": "lora" if config.lora is not None else "full",
        "base_model": base_identity,
        "texts_sha256": texts_hash(texts),
        "n_texts": len(texts),
        "n_train": len(train_texts),
        "n_val": len(prompts) or len(val_texts),
        "validation": ({"kind": "prompts", "sha256": texts_hash([f"{p}\t{a}" for p, a in prompts]),
                        "best_by": "target_prob"} if prompts else
                       {"kind": "split", "best_by": "loss"} if val_texts else None),
        "n_train_tokens": sum(len(s) for s in train_seqs),
        "config": config.to_dict(),
        "seed": config.seed,
        "epochs_run": len(history),
        "stopped_early": stopped or log.stopped,
        "best_epoch": best_epoch,
        "final_train_loss": history[-1].train_loss,
        "final_val_loss": history[-1].val_loss,
        "selected_train_loss": selected.train_loss,
        "selected_val_loss": selected.val_loss,
        "history": [dataclasses.asdict(h) for h in history],
        "seconds": round(time.time() - started, 3),
        "versions": environment_versions(),
        **(extra_manifest or {}),
    }
    if config.lora is None:
        manifest["weights_sha256"] = weights_fingerprint(model)
    result = FinetuneResult(model, history, best_epoch, manifest, None, stopped or log.stopped)
    if out is not None:
        result.out_dir = save_finetuned(model, tokenizer, manifest, out, overwrite=overwrite)
    return result


def _progress(progress: bool | Any) -> Any:
    """The bar on a terminal; elsewhere (a file, a pipe, a notebook without ipywidgets) plain
    lines: one per epoch (:class:`_EpochLog`) and one a minute within a long epoch."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..util.progress import progress_bar

    if progress is False:
        console = Console(quiet=True)
    elif progress is True:
        console = Console(stderr=True)
    else:
        console = progress
    return progress_bar(TextColumn("[bold]{task.description}[/bold] epoch {task.fields[epoch]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                        TextColumn("left"), TimeRemainingColumn(), console=console, tenths=False)


def cached_finetune(model: Any, tokenizer: Any, texts: Sequence[str], *, config: FinetuneConfig = PAPER,
                    cache: str | Path | None = None, stop_when: Callable[[Any, int], bool] | None = None,
                    stop_key: str | None = None, extra_manifest: dict[str, Any] | None = None,
                    progress: bool | Any = True, refresh: bool = False,
                    validation: Sequence[tuple[str, str]] | None = None) -> tuple[Any, dict[str, Any], bool, Path]:
    """Finetune a **copy** of ``model`` (``model`` is untouched), or load the result of an identical
    earlier call from the cache. Returns ``(finetuned model, manifest, was_cached, folder)``.

    The folder is ``<cache>/finetuned/<key>`` with :func:`finetune_key` of the base model's
    weights, the texts, ``config``, ``validation`` and ``stop_key`` — a string that must describe ``stop_when``
    (a function cannot be hashed), e.g. ``"probe=sentence_2;top1>=0.9"``. ``cache`` defaults to
    :func:`nngraft.donors.loading.cache_dir`. ``refresh=True`` trains again and replaces the entry.
    """
    from ..donors.loading import cache_dir, weights_fingerprint

    if stop_when is not None and stop_key is None:
        raise FinetuneError("cached_finetune with stop_when needs stop_key (a description of the stop rule) "
                            "so that runs with different rules are cached apart")
    key = finetune_key(weights_fingerprint(model), texts, config, stop_key, validation)
    folder = Path(cache) if cache is not None else cache_dir()
    folder = folder / "finetuned" / key[:24]
    device = next(model.parameters()).device
    if not refresh and (folder / MANIFEST_FILE).is_file():
        manifest = read_finetune_manifest(folder)
        if manifest.get("cache_key") == key:
            finetuned = load_finetuned(folder, base=copy_model(model) if manifest["kind"] == "lora" else None,
                                       dtype=next(model.parameters()).dtype, device=device)
            return finetuned, manifest, True, folder
    result = finetune(copy_model(model), tokenizer, texts, config=config, out_dir=folder, overwrite=True,
                      progress=progress, stop_when=stop_when, validation=validation,
                      extra_manifest={**(extra_manifest or {}), "cache_key": key, "stop_rule": stop_key})
    finetuned = result.model
    if config.lora is not None:
        finetuned = finetuned.merge_and_unload()
    return finetuned.eval(), result.manifest, False, folder


