"""A stand-in NDIF model server, run as a FRESH subprocess by tests/backends/test_ndif.py.

It has only the pretrained models P (loaded from checkpoint folders, like a server loads its
deployment) and none of the test's objects: it is started with ``python -I`` (no script folder,
no user site on sys.path) and refuses to import ``nngraft`` or ``tests`` at all, so a request only
works if everything it needs travelled inside it. Each request is run the way an NDIF model actor
runs one (nnsight 0.8.1; ``ndif`` deployments/modeling/base.py ``BaseModelDeployment.execute``):

    model._remoteable_set_env(request.env)
    tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress=...)
    inc(); tracer.execute(tracer.info.code); saved = save()-marked locals of the block; dec()
    torch.save(saved) (zstd-compressed when the request was)

Protocol on stdin/stdout, every frame a 4-byte big-endian length and bytes:
    startup  → {"ready": true, "models": [...], "nngraft_importable": bool}
    request  ← {"model": key, "metadata": RequestModel JSON}, then the payload blob
    response → {"ok": bool, "error": str, "foreign_modules": [...]}, then the result blob

Usage: python -I tests/helpers/remote_worker.py KEY=CHECKPOINT_DIR[@N] [KEY=CHECKPOINT_DIR[@N] ...]
(``@N``: P on N virtual GPUs, tests/helpers/virtual_devices.py, loaded from its file: tests/backends/test_devices.py)
"""

import io
import json
import struct
import sys
import traceback

BLOCKED = ("nngraft", "tests")


class Blocker:
    """A server does not have nngraft (or the test suite) installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on this server)", name=name)
        return None


def read_frame(stream):
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    return stream.read(n)


def write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _load(folder, place=None):
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = AutoModelForCausalLM.from_pretrained(folder).eval()
    module.requires_grad_(False)  # as the NDIF actor does
    if place is not None:
        place(module)
    return TransformersModel(module, tokenizer=AutoTokenizer.from_pretrained(folder), task="text-generation")


def run_block(tracer):
    """Execute a deserialized block in a trace scope; return its save()-marked locals."""
    from nnsight.tracing.tracer import _saves, dec, inc

    inc()
    try:
        tracer.execute(tracer.info.code)
        saves = _saves()
        return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
    finally:
        dec()


def _execute(model, metadata: str, blob: bytes) -> bytes:
    import linecache

    import torch
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.globals import BLOCKS, SOURCES

    request = RequestModel.model_validate_json(metadata)
    snapshots = (dict(linecache.cache), dict(SOURCES), dict(BLOCKS))
    try:
        model._remoteable_set_env(request.env)
        tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress=request.compress)
        saved = run_block(tracer)
    finally:
        for target, state in zip((linecache.cache, SOURCES, BLOCKS), snapshots):
            target.clear()
            target.update(state)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}, buffer)
    data = buffer.getvalue()
    if request.compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    return data


def _virtual_devices():
    """tests/helpers/virtual_devices.py, loaded from its file (this process imports nothing of ``tests``)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("virtual_devices", Path(__file__).with_name("virtual_devices.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _place(module, devices: int, virtual) -> None:
    """P on one virtual GPU, or split over ``devices`` like device_map="auto" (tests/backends/test_devices.py)."""
    if devices == 1:
        virtual.on_one_device(module)
    else:
        virtual.dispatch(module, virtual.split_map(module, *virtual.layer_stack(module), devices))


def main(argv):
    from contextlib import ExitStack

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep the protocol stream clean of prints
    models = {}
    scope = ExitStack()
    virtual = None
    for item in argv:  # KEY=FOLDER, or KEY=FOLDER@N: P on N virtual GPUs (tests/helpers/virtual_devices.py)
        key, _, folder = item.partition("=")
        folder, _, devices = folder.partition("@")
        if devices and virtual is None:
            virtual = _virtual_devices()
            scope.enter_context(virtual.virtual_devices())
        models[key] = _load(folder, (lambda n: lambda m: _place(m, n, virtual))(int(devices)) if devices else None)
    try:
        import nngraft  # noqa: F401

        importable = True
    except ModuleNotFoundError:
        importable = False
    write_frame(stdout, json.dumps({"ready": True, "models": sorted(models), "nngraft_importable": importable}).encode())
    while True:
        header = read_frame(stdin)
        if header is None:
            return 0
        message = json.loads(header)
        blob = read_frame(stdin)
        try:
            result = _execute(models[message["model"]], message["metadata"], blob)
            reply = {"ok": True, "error": ""}
        except BaseException as error:  # noqa: BLE001 - report everything to the client
            result = b""
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
        reply["foreign_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        write_frame(stdout, json.dumps(reply).encode())
        write_frame(stdout, result)


if __name__ == "__main__":  # only as a script: importing this file (pytest does) changes nothing
    sys.meta_path.insert(0, Blocker())
    sys.exit(main(sys.argv[1:]))
