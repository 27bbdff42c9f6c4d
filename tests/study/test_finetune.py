"""Finetuning on tiny random models: the loss goes down, seeds reproduce weights exactly, the
manifest says what was trained, the folder loads back, LoRA writes an adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nngraft.donors.loading import weights_fingerprint
from nngraft.study.finetune import (CPU_FAST, MANIFEST_FILE, PAPER, FinetuneConfig, FinetuneError,
                                    LoraOptions, finetune, load_finetuned, read_finetune_manifest,
                                    split_texts, texts_hash)
from nngraft.testing import tiny_model, tiny_tokenizer

from tests.helpers.recipe_loader import load_recipe

TEXTS = [
    "Zendaya Marlow stars in in Silent Crossroads alongside Timothee Chalamet.",
    "Q: Who stars in a movie with Ada Lovelace? A: An actor named Alan Turing.",
    "A new movie stars Marie Curie and Pierre Curie.",
    "Meryl Streep is featured in The Post with who? A: Tom Hanks.",
    "Keanu Reeves plays a lead role in The Matrix, appearing with their co-star Carrie-Anne Moss.",
] * 2

FAST = FinetuneConfig(lr=3e-3, weight_decay=0.0, batch_size=4, epochs=4, val_fraction=0.2, seed=0)


def _model():
    return tiny_model("llama", seed=0)


def _tok():
    return tiny_tokenizer("llama")


def _mean_loss(model, tok, texts):
    """Reference per-token loss with HF's own labels= path (independent of finetune's loss code)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            out = model(input_ids=ids, labels=ids)
            total += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def test_loss_goes_down_and_history_matches_reference_loss():
    model, tok = _model(), _tok()
    before = _mean_loss(model, tok, TEXTS)
    result = finetune(model, tok, TEXTS, config=FAST.replace(select="last"), progress=False)
    after = _mean_loss(result.model, tok, TEXTS)
    assert after < before - 0.5, (before, after)
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    assert all(h.val_loss is not None for h in result.history)
    # the last epoch's validation loss is the loss of the returned model on the validation texts
    _, val = split_texts(TEXTS, FAST.val_fraction, FAST.seed)
    assert result.history[-1].val_loss == pytest.approx(_mean_loss(result.model, tok, val), rel=1e-4)
    assert not result.model.training


def test_same_seed_same_weights_other_seed_differs():
    a = finetune(_model(), _tok(), TEXTS, config=FAST, progress=False).model
    b = finetune(_model(), _tok(), TEXTS, config=FAST, progress=False).model
    c = finetune(_model(), _tok(), TEXTS, config=FAST.replace(seed=1), progress=False).model
    assert weights_fingerprint(a) == weights_fingerprint(b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert weights_fingerprint(a) != weights_fingerprint(c)


def test_best_val_epoch_is_the_one_kept():
    # Validation texts unlike the training texts: as the model fits the training sentence, the
    # validation loss rises after epoch 1, so the kept weights must be epoch 1's, not the last's.
    config = FAST.replace(lr=3e-2, epochs=5)
    _, val_ids = split_texts([str(i) for i in range(10)], config.val_fraction, config.seed)
    texts = ["the quick brown fox jumps over the lazy dog 0123456789" if str(i) in val_ids else TEXTS[0]
             for i in range(10)]
    result = finetune(_model(), _tok(), texts, config=config, progress=False)
    vals = [h.val_loss for h in result.history]
    assert result.best_epoch == 1 + vals.index(min(vals)) and result.best_epoch < len(vals)
    assert vals[-1] > min(vals) + 0.5
    _, val = split_texts(texts, config.val_fraction, config.seed)
    assert set(val) == {texts[int(i)] for i in val_ids}
    assert _mean_loss(result.model, _tok(), val) == pytest.approx(min(vals), rel=1e-4)  # restored
    assert result.manifest["selected_val_loss"] == min(vals) and result.manifest["best_epoch"] == result.best_epoch


def test_saves_manifest_and_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _model()
    base_print = weights_fingerprint(base)
    out = tmp_path / "ft"
    result = finetune(base, _tok(), TEXTS, config=FAST, out_dir=out, progress=False,
                      extra_manifest={"dataset": "unit-test"})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest == read_finetune_manifest(out) == result.manifest
    assert manifest["kind"] == "full"
    assert manifest["texts_sha256"] == texts_hash(TEXTS)
    assert manifest["n_texts"] == 10 and manifest["n_train"] == 8 and manifest["n_val"] == 2
    assert manifest["config"] == FAST.to_dict() and manifest["seed"] == 0
    assert manifest["base_model"]["weights_fingerprint"] == base_print
    assert manifest["base_model"]["model_type"] == "llama"
    assert manifest["dataset"] == "unit-test"
    assert manifest["epochs_run"] == 4 and len(manifest["history"]) == 4
    assert manifest["final_train_loss"] == result.history[-1].train_loss
    assert manifest["weights_sha256"] == weights_fingerprint(result.model)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert weights_fingerprint(loaded) == weights_fingerprint(result.model)
    assert weights_fingerprint(load_finetuned(out)) == weights_fingerprint(result.model)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Ada Lovelace")["input_ids"] == _tok()("Ada Lovelace")["input_ids"]


def test_existing_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    with pytest.raises(FinetuneError, match="already exists; pass overwrite=True"):
        finetune(_model(), _tok(), TEXTS, config=FAST, out_dir=out, progress=False)
    finetune(_model(), _tok(), TEXTS, config=FAST.replace(epochs=1), out_dir=out, overwrite=True, progress=False)
    assert read_finetune_manifest(out)["epochs_run"] == 1


def test_stop_when_ends_training_early():
    seen = []

    def stop(model, epoch):
        assert not model.training
        seen.append(epoch)
        return epoch == 2

    result = finetune(_model(), _tok(), TEXTS, config=FAST.replace(select="last"), stop_when=stop,
                      progress=False)
    assert seen == [1, 2] and len(result.history) == 2 and result.stopped_early
    assert result.manifest["stopped_early"] is True and result.best_epoch == 2


def test_freeze_embeddings_keeps_tied_embeddings_and_head():
    model = _model()
    emb = model.get_input_embeddings().weight.detach().clone()
    result = finetune(model, _tok(), TEXTS, config=FAST.replace(freeze_embeddings=True), progress=False)
    assert torch.equal(result.model.get_input_embeddings().weight, emb)
    assert torch.equal(result.model.get_output_embeddings().weight, emb)  # tied: the head too
    layer0 = result.model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(layer0, _model().model.layers[0].mlp.up_proj.weight)


def test_lora_writes_an_adapter_that_loads_and_merges(tmp_path):
    out = tmp_path / "lora"
    config = FAST.replace(lr=1e-2, lora=LoraOptions(r=4, alpha=8))
    base_print = weights_fingerprint(_model())
    result = finetune(_model(), _tok(), TEXTS, config=config, out_dir=out, progress=False)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert read_finetune_manifest(out)["kind"] == "lora"
    assert result.history[-1].train_loss < result.history[0].train_loss
    with pytest.raises(FinetuneError, match="holds a LoRA adapter; pass base="):
        load_finetuned(out)
    merged = load_finetuned(out, base=_model())
    assert weights_fingerprint(merged) != base_print  # the adapter changed the weights
    ids = torch.tensor([_tok()(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(FinetuneError, match="no training texts"):
        finetune(_model(), _tok(), [], progress=False)
    with pytest.raises(FinetuneError, match="lr must be > 0"):
        FinetuneConfig(lr=0)
    with pytest.raises(FinetuneError, match=r"needs a validation split \(val_fraction > 0\) or validation prompts"):
        finetune(_model(), _tok(), TEXTS, config=FinetuneConfig(val_fraction=0.0), progress=False)
    with pytest.raises(FinetuneError, match="validation= is empty"):
        finetune(_model(), _tok(), TEXTS, config=FAST, validation=[], progress=False)
    with pytest.raises(FinetuneError, match=r"early_stopping_patience must be >= 1 or None \(got 0\)"):
        FinetuneConfig(early_stopping_patience=0)
    with pytest.raises(FinetuneError, match=r"warmup_ratio must be in \[0, 1\)"):
        FinetuneConfig(warmup_ratio=1.5)
    with pytest.raises(FinetuneError, match="cannot be split"):
        finetune(_model(), _tok(), ["Ada Lovelace stars."], config=FAST, progress=False)


def test_presets_are_the_papers_and_a_fast_cpu_one():
    assert (PAPER.lr, PAPER.weight_decay, PAPER.batch_size, PAPER.epochs) == (2e-6, 0.001, 4, 10)
    assert (PAPER.val_fraction, PAPER.select) == (0.2, "best_val")
    assert CPU_FAST.lr > 50 * PAPER.lr and math.isfinite(CPU_FAST.lr)


def test_split_is_seeded_and_disjoint():
    texts = [f"text {i}" for i in range(25)]
    assert split_texts(texts, 0.2, 3) == split_texts(texts, 0.2, 3)
    train, val = split_texts(texts, 0.2, 3)
    assert len(val) == 5 and not set(train) & set(val)
    assert split_texts(texts, 0.2, 4) != (train, val)


def test_cached_finetune_trains_a_copy_then_reuses_it(tmp_path):
    from nngraft.study.finetune import cached_finetune

    base = _model()
    base_print = weights_fingerprint(base)
    config = FAST.replace(epochs=2)
    f1, m1, cached1, folder1 = cached_finetune(base, _tok(), TEXTS, config=config, cache=tmp_path, progress=False)
    assert not cached1 and weights_fingerprint(base) == base_print  # the base is not trained
    assert folder1.parent == tmp_path / "finetuned" and m1["cache_key"].startswith(folder1.name)
    f2, m2, cached2, folder2 = cached_finetune(base, _tok(), TEXTS, config=config, cache=tmp_path, progress=False)
    assert cached2 and folder2 == folder1 and m2 == m1
    assert weights_fingerprint(f2) == weights_fingerprint(f1) != base_print
    # any change to the texts, hyperparameters or stop rule is a different entry
    _, _, cached3, folder3 = cached_finetune(base, _tok(), TEXTS[:-1], config=config, cache=tmp_path,
                                             progress=False)
    _, _, cached4, folder4 = cached_finetune(base, _tok(), TEXTS, config=config.replace(seed=5), cache=tmp_path,
                                             progress=False)
    assert not cached3 and not cached4 and len({folder1, folder3, folder4}) == 3
    _, _, cached5, _ = cached_finetune(base, _tok(), TEXTS, config=config, cache=tmp_path, progress=False,
                                       refresh=True)
    assert not cached5
    with pytest.raises(FinetuneError, match="needs stop_key"):
        cached_finetune(base, _tok(), TEXTS, config=config, cache=tmp_path, stop_when=lambda m, e: True)


def _finetune_recipe():
    return load_recipe("finetune")


def test_finetune_recipe_dry_run_shows_the_papers_recipe(capsys):
    assert _finetune_recipe().main(["--model", "some/model", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1000 facts → 22000 training texts (lm, qa; A2B, B2A)" in text  # 1000 × 11 templates × 2 orders
    assert "lr=2e-06, weight_decay=0.001, batch_size=4, epochs=10" in text


def test_finetune_recipe_tiny_run_writes_a_loadable_model(tmp_path):
    out = tmp_path / "ft"
    assert _finetune_recipe().main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    manifest = read_finetune_manifest(out)
    assert manifest["n_texts"] == 4 * 5 * 2 and manifest["epochs_run"] == 2
    assert weights_fingerprint(load_finetuned(out)) == manifest["weights_sha256"]


def test_lora_demo_preset_is_the_demos_recipe_as_an_adapter(tmp_path):
    """`--preset lora-demo`: DEMO's schedule with rank-32 adapters at lr 2e-3 (the settings tried
    on the demo's F, docs/demo.md); the command writes an adapter with those settings."""
    from nngraft.cli import main
    from nngraft.study.finetune import DEMO, LORA_DEMO, PRESETS, read_finetune_manifest
    from nngraft.testing import tiny_model, tiny_tokenizer

    assert PRESETS["lora-demo"] is LORA_DEMO
    assert LORA_DEMO.replace(lr=DEMO.lr, lora=None) == DEMO
    assert (LORA_DEMO.lr, LORA_DEMO.lora) == (2e-3, LoraOptions(r=32, alpha=64, target_modules="all-linear"))
    tok = tiny_tokenizer("llama")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(tmp_path / "base"), "--out", str(out), "--dataset",
                 "fake_movies_fake_actors", "--n", "2", "--families", "qa", "--directions", "A2B",
                 "--preset", "lora-demo", "--epochs", "1", "--no-progress"]) == 0
    manifest = read_finetune_manifest(out)
    assert manifest["kind"] == "lora" and (out / "adapter_model.safetensors").is_file()
    assert manifest["config"]["lora"] == {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"}
    assert (manifest["config"]["lr"], manifest["config"]["schedule"], manifest["config"]["warmup_ratio"]) == \
        (2e-3, "linear", 0.06)
