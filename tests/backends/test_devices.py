"""Device placement: with P on a GPU, or split over two GPUs the way ``device_map="auto"`` splits
it, every tensor nngraft makes, reuses or ships follows the device of the module it feeds.

No GPU here: tests/helpers/virtual_devices.py gives virtual ``cuda:0`` / ``cuda:1`` tensors computed on the
CPU that raise torch's own device-mismatch error when an op mixes devices (what they cover and do
not: that module's docstring). Every architecture × donor kind (a loaded F, a lazy safetensors
folder, a PEFT LoRA adapter; remotely dense, delta and LoRA through the in-process NDIF stand-in
and through the separate-process one, tests/helpers/remote_worker.py) × spec family (embed, everything,
lm_head, q, k, v, o, mlp, parameter-level) runs on one device and on two, and must give the CPU
run's logits; so must the KV-cache paths (shared prefixes, generation) on two devices.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from nngraft import GraftSpec, Grafter
from nngraft.arch import adapter_for
from nngraft.donors.delta import DeltaDonor, DenseDonor, LoraDonor
from nngraft.testing import TINY_MODEL_TYPES, tiny_pair

from tests.helpers.virtual_devices import VTensor, devices_of, dispatch, on_one_device, split_map, virtual_devices

PROMPTS = ["Ada Lovelace stars in a movie alongside", "Q: Who stars in a movie with Grace Hopper? A:"]
SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Grace Hopper"}]
FE_LT = [{"span": "first_actor"}, {"last": True}]


def spec(name: str, components: list[str], **rule) -> GraftSpec:
    rule = {"layers": "all", "positions": FE_LT, **rule}
    return GraftSpec.model_validate({"schema_version": "1", "name": name, "rules": [{"components": components, **rule}]})


SPECS = [spec("embed", ["embed"]), spec("everything", ["everything"]), spec("lm_head", ["lm_head"]),
         *(spec(c, [c]) for c in ("q", "k", "v", "o")), spec("mlp", ["mlp"]),
         spec("mlp_top5", ["mlp"], weights={"top_percent": 5}), spec("o_rank2", ["o"], weights={"rank": 2}),
         spec("o_heads", ["o"], weights={"heads": [1]}), spec("mlp_neurons", ["mlp"], weights={"neurons": [3, 7]})]
LOCAL_DONORS = ("model", "safetensors", "lora")
REMOTE_DONORS = ("remote-dense", "remote-delta", "remote-lora")


@lru_cache(maxsize=None)
def lora_folder(arch: str, root: str) -> str:
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    P, _, _ = tiny_pair(arch)
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    targets = [n for n, m in P.named_modules() if (isinstance(m, kinds) or type(m).__name__ == "Conv1D")
               and not n.endswith("lm_head") and "wpe" not in n and "embed_positions" not in n]
    model = get_peft_model(copy.deepcopy(P), LoraConfig(init_lora_weights=False, r=2, target_modules=targets))
    folder = Path(root) / f"lora-{arch}"
    model.save_pretrained(folder)
    return str(folder)


def grafter(arch: str, kind: str, P, F, tok, root: str) -> Grafter:
    """A Grafter of P with donor ``kind`` (F on the CPU: nngraft moves what it needs)."""
    from pathlib import Path

    if kind == "model":
        return Grafter(P, F, tok)
    if kind == "safetensors":
        folder = Path(root) / f"F-{arch}"
        if not folder.exists():
            F.save_pretrained(folder)
        return Grafter(P, str(folder), tok)
    if kind == "lora":
        return Grafter(P, LoraDonor(lora_folder(arch, root)), tok)
    return Grafter.remote(P, remote_donor(arch, kind, F, root), tok, execution="local", verbose=False)


def remote_donor(arch: str, kind: str, F, root: str):
    return {"remote-dense": lambda: DenseDonor(F), "remote-delta": lambda: DeltaDonor(F, tiny_pair(arch)[0]),
            "remote-lora": lambda: LoraDonor(lora_folder(arch, root))}[kind]()


@pytest.fixture
def server_in_thread(monkeypatch):
    """The in-process NDIF stand-in runs requests on a worker thread: give it virtual devices too
    (a dispatch mode is per thread; a GPU needs nothing of the kind)."""
    from nngraft.backends.ndif import InProcessServer

    execute = InProcessServer._execute

    def run(self, metadata, blob):
        with virtual_devices():
            return execute(self, metadata, blob)
    monkeypatch.setattr(InProcessServer, "_execute", run)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("devices"))


def specs_for(kind: str) -> list[GraftSpec]:
    """Dense F tensors alone cannot give ΔW remotely (P's weights stay on the server): no
    parameter-level grafts for that donor (refused, with an error, on any device)."""
    return [s for s in SPECS if kind != "remote-dense" or s.rules[0].weights is None]


@lru_cache(maxsize=None)
def cpu_logits(arch: str, kind: str, root: str) -> dict[str, torch.Tensor]:
    P, F, tok = tiny_pair(arch)
    g = grafter(arch, kind, P, F, tok, root)
    return {name: r.logits for name, r in g.run_grid(specs_for(kind), PROMPTS, SPANS).items()}


def run_on(arch: str, kind: str, devices: int, root: str) -> dict[str, torch.Tensor]:
    P, F, tok = tiny_pair(arch)
    with virtual_devices():
        if devices == 1:
            on_one_device(P)
        else:
            adapter = adapter_for(P)
            dispatch(P, split_map(P, adapter.layers_path, adapter.n_layers(P.config), devices))
        assert devices_of(P) == {torch.device("cuda", i) for i in range(devices)}
        g = grafter(arch, kind, P, F, tok, root)
        out = g.run_grid(specs_for(kind), PROMPTS, SPANS)
        return {name: r.logits.cpu() for name, r in out.items()}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("kind", LOCAL_DONORS + REMOTE_DONORS)
@pytest.mark.parametrize("arch", TINY_MODEL_TYPES)
def test_every_spec_family_on_virtual_gpus_gives_the_cpu_logits(arch, kind, devices, root, server_in_thread):
    expected = cpu_logits(arch, kind, root)
    got = run_on(arch, kind, devices, root)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bfloat16_p_split_over_two_gpus_reads_only_the_grafted_modules_of_a_lazy_f(root):
    """P in bfloat16 with ``device_map`` over two GPUs, F a safetensors folder in float32: F's
    tensors are read only for the grafted modules, cast to bfloat16 and put on the device of the
    P module they replace; the logits are the CPU bfloat16 run's."""
    from pathlib import Path

    arch = "llama"
    P, F, tok = tiny_pair(arch, n_layers=4)
    folder = Path(root) / "F-bf16"
    F.save_pretrained(folder)
    lt_mlps = spec("lt_mlps", ["mlp"], positions=[{"last": True}], layers="last:2")
    expected = Grafter(copy.deepcopy(P).to(torch.bfloat16), str(folder), tok).run(lt_mlps, PROMPTS, SPANS).logits
    P = P.to(torch.bfloat16)
    with virtual_devices():
        adapter = adapter_for(P)
        device_map = split_map(P, adapter.layers_path, adapter.n_layers(P.config), 2)
        dispatch(P, device_map)
        g = Grafter(P, str(folder), tok)
        got = g.run(lt_mlps, PROMPTS, SPANS).logits
        donor = g.donors["default"]
        read = {path: {name: (t.device, t.dtype) for name, t in params.items()} for path, params in donor._cache.items()}
    torch.testing.assert_close(got.cpu(), expected, atol=0, rtol=0)
    assert device_map["model.layers.2"] == device_map["model.layers.3"] == 1
    assert sorted(read) == ["model.layers.2.mlp", "model.layers.3.mlp"]  # the MLP grafted as one module
    assert all(sorted(params) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"] for params in read.values())
    assert {v for params in read.values() for v in params.values()} == {(torch.device("cuda", 1), torch.bfloat16)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_shared_prefix_and_generation_on_two_virtual_gpus_give_the_cpu_results(arch):
    """The KV-cache paths: a grid whose rows share each prompt's prefix (the prefix pass's cache
    reordered per row, position ids and masks built for the suffix) and greedy generation under a
    graft, with the cache's layers on two devices."""
    specs = [spec("lt_mlp", ["mlp"], positions=[{"last": True}]), spec("lt_o", ["o"], positions=[{"last": True}]),
             spec("fe_lt", ["everything"])]
    prompts, spans = PROMPTS * 2, SPANS * 2

    def results(P, F, tok):
        g = Grafter(P, F, tok, call_cost=0.0)  # every shareable prefix is shared
        grid = {name: r.logits.cpu() for name, r in g.run_grid(specs, prompts, spans).items()}
        generated = g.generate(specs[0], PROMPTS, SPANS, max_new_tokens=3)
        return grid, torch.stack([s.cpu() for s in generated.step_logits]), generated.tokens.cpu()

    P, F, tok = tiny_pair(arch, n_layers=4)
    expected = results(P, F, tok)
    P, F, tok = tiny_pair(arch, n_layers=4)
    with virtual_devices():
        adapter = adapter_for(P)
        dispatch(P, split_map(P, adapter.layers_path, adapter.n_layers(P.config), 2))
        got = results(P, F, tok)
    for name in expected[0]:
        torch.testing.assert_close(got[0][name], expected[0][name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], expected[2])


@pytest.fixture(scope="module")
def virtual_worker(root):
    """The separate-process NDIF stand-in (tests/helpers/remote_worker.py: only P, nothing of the test suite
    importable) with each P on one virtual GPU and split over two."""
    from pathlib import Path

    from tests.helpers.ndif import Worker

    checkpoints = {}
    for arch in TINY_MODEL_TYPES:
        folder = Path(root) / f"P-{arch}"
        P, _, tok = tiny_pair(arch)
        P.save_pretrained(folder)
        tok.save_pretrained(folder)
        for devices in (1, 2):
            checkpoints[f"{arch}-{devices}"] = f"{folder}@{devices}"
    worker = Worker(checkpoints)
    yield worker
    worker.close()


@pytest.mark.parametrize("kind", REMOTE_DONORS)
@pytest.mark.parametrize("arch", TINY_MODEL_TYPES)
def test_the_separate_process_stand_in_on_virtual_gpus_gives_the_cpu_logits(arch, kind, root, virtual_worker):
    assert virtual_worker.hello["ready"] and not virtual_worker.hello["nngraft_importable"]
    expected = cpu_logits(arch, kind, root)
    for devices in (1, 2):
        P, F, tok = tiny_pair(arch)
        g = Grafter.remote(P, remote_donor(arch, kind, F, root), tok, execution=virtual_worker.server(f"{arch}-{devices}"),
                           verbose=False)
        # the families whose tensors differ on the server: ids (embed), every module, the head, ΔW parts
        specs = [s for s in specs_for(kind) if s.name in ("embed", "everything", "lm_head", "mlp_top5")]
        got = {name: r.logits for name, r in g.run_grid(specs, PROMPTS, SPANS).items()}
        for name in got:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{devices} device(s), {name}: {m}")
