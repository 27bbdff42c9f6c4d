"""A stand-in for NDIF's SANDBOXED request path (ordinary, untrusted API keys), run by
tests/backends/test_sandbox.py as fresh subprocesses. Two roles, one file (framing, blocker and block
runner come from tests/helpers/remote_worker.py, the trusted-path stand-in next door):

``host``   the model actor: holds P with its weights (loaded from checkpoint folders), takes
           requests from the client on stdin/stdout, and for each request drives a FRESH
           ``runner`` process (forked from a warmed template, as NDIF's pool pre-warms runners)
           over a Unix socket, running the forward pass on the runner's behalf.
``runner`` the sandbox: builds a weightless (meta) P from the checkpoint's config only, cannot
           import ``nngraft`` or ``tests``, deserializes the request with every module reference
           resolved to its meta module, and executes the block. Each ``.input``/``.output`` read or
           write of an activation crosses the socket to the host and back.

Written after NDIF's server code (ndif-team/ndif, src/ndif/services/ray/sandbox/: ARCHITECTURE.md
and protocol.py at 03d5ea5b, nns.py at 0d7ec7c3, driver.py at 2b0e064a, runner.py at 0d15eb45;
deployments/modeling/nns.py at 0d7ec7c3), ported to the installed nnsight 0.8.1, not copied:

- the interleaver is split at the mediator: the worker greenlets run in the runner; the host
  holds one proxy per worker (an nnsight ``Mediator`` whose ``switch`` is a socket round trip)
  and serves it with nnsight's own ``Mediator.handle``;
- a worker parks untagged (event, location, pin, ...); the host resolves the occurrence;
- host -> runner: ``(blob, compress, dtype, seed, env)``, ``RESUME(id, args, pin)``,
  ``THROW(id, location, is_iter)``, ``DONE(result)``;
  runner -> host: ``INTERLEAVE(fn, parks, batch_groups, invokes, kwargs)``, ``PARK(id, park)``,
  ``STOP``, ``END(saved_bytes, info)``, ``EXCEPTION(text)``;
- a read hands the runner a COPY, so after the worker moves on the runner writes the read value
  back (a SWAP park) so that in-place edits reach the model — as NDIF's ``writeback`` does;
- the block and the host's forward pass both run inside NDIF's autocast bracket (CUDA and a
  half-precision model only; a no-op on CPU).

Not emulated (stated in docs/remote.md): ``.source``, ad-hoc module calls (CALL), ``tracer.cache``,
gradients, several peers (tensor parallelism), printing (PRINT), the runner pool's timeouts.
Both directions use one framing (8-byte length + one tagged value); NDIF packs runner -> host
messages field by field, which changes a few bytes per message, not what crosses.

The host answers each request with statistics of what crossed the socket: ``reads`` (RESUMEs that
carried a value), ``writes`` (SWAP/SKIP parks, write-backs included), ``round_trips`` (every
RESUME, each answered by one PARK), and the tensor bytes of each (``read_bytes``,
``write_bytes``), plus ``wire_bytes`` (all frames, both ways).

Client protocol (stdin/stdout, 4-byte big-endian length frames), as tests/helpers/remote_worker.py:
    startup  -> {"ready": true, "models": [...]}
    request  <- {"model": key, "metadata": RequestModel JSON}, then the payload blob
    response -> {"ok": bool, "error": str, "stats": {...}, "runner": {...}}, then the result blob

Usage: python -I tests/helpers/sandbox_server.py host KEY=CHECKPOINT_DIR=DTYPE [...]
       python -I tests/helpers/sandbox_server.py runner SOCKET_PATH CHECKPOINT_DIR   (started by the host)
"""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

# Started with -I (no script folder on sys.path): reach the stand-in server next door explicitly.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from remote_worker import BLOCKED, Blocker, read_frame, run_block, write_frame  # noqa: E402

sys.path.pop(0)


# -- the wire: length-prefixed frames holding one tagged value ------------------------------------


def _recvn(sock, n):
    buffer = bytearray()
    while len(buffer) < n:
        chunk = sock.recv(n - len(buffer))
        if not chunk:
            raise ConnectionError("the other end closed the socket mid-message")
        buffer.extend(chunk)
    return bytes(buffer)


def encode(value):
    if isinstance(value, bytes):
        return b"\x01" + value
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return b"\x03" + buffer.getvalue()


def decode(blob):
    if blob[:1] == b"\x01":
        return blob[1:]
    import torch

    return torch.load(io.BytesIO(blob[1:]), weights_only=False)


class Channel:
    """One end of the Unix socket; counts the frames it moves."""

    def __init__(self, sock):
        self.sock = sock
        self.wire_bytes = 0

    def send(self, value):
        data = encode(value)
        self.sock.sendall(struct.pack(">Q", len(data)) + data)
        self.wire_bytes += 8 + len(data)

    def recv(self):
        (n,) = struct.unpack(">Q", _recvn(self.sock, 8))
        self.wire_bytes += 8 + n
        return decode(_recvn(self.sock, n))


def tensor_bytes(value):
    """Bytes of every tensor inside ``value`` (tuples, lists, dicts, model outputs)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def autocast_bracket(dtype):
    """NDIF's request dtype region: autocast to the model's dtype on CUDA for half precision."""
    import torch

    enabled = torch.cuda.is_available() and dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device_type="cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


# =================================================================================================
# runner: the sandbox process (meta model, worker greenlets)
# =================================================================================================


def runner_main(socket_path, folder):
    sys.meta_path.insert(0, Blocker())
    import torch
    from greenlet import getcurrent
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.interleaver import (EarlyStopException, Event, Interleaver, Mediator, OutOfOrderError,
                                                  Pending)
    from nnsight.intervention.serialization import CustomCloudUnpickler
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.request import RequestModel
    from transformers import AutoTokenizer

    meta = TransformersModel(folder, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(folder))
    connection = None

    def park(cls, event, location, *rest):
        # Park untagged (the pin in the occurrence's place): the host owns the occurrence counter.
        mediator = cls.current(location)
        mediator.flush()
        return getcurrent().parent.switch(Pending(event, location, mediator.iteration, *rest))

    Mediator.event = classmethod(park)

    class RunnerInterleaver(Interleaver):
        """Workers run here; the model side is the host, reached over the socket."""

        def instrument(self, envoy):
            pass  # no model in this process: nothing to hook

        def pump(self):
            reads = {i: (m.pending[1], m.pending[2]) for i, m in enumerate(self.mediators)
                     if m.pending is not None and m.pending[0] is Event.VALUE}
            while True:
                message = connection.recv()
                if message[0] == "DONE":
                    return message[1]
                if message[0] == "THROW":
                    _, i, location, is_iter = message
                    error = OutOfOrderError(f"'{location}' was requested but the model already ran past it")
                    self.mediators[i].worker.throw(error)
                    continue
                _, i, args, pin = message  # RESUME
                mediator = self.mediators[i]
                mediator.iteration = pin
                read = reads.pop(i, None)
                try:
                    parked = mediator.switch(*args)
                except EarlyStopException:
                    connection.send(("STOP",))
                    raise
                if read is not None:
                    # The worker got a copy: write it back so in-place edits reach the model.
                    connection.send(("PARK", i, Pending(Event.SWAP, read[0], read[1], args[0])))
                    connection.recv()  # the host's RESUME for that swap
                if parked is not None and parked[0] is Event.VALUE:
                    reads[i] = (parked[1], parked[2])
                connection.send(("PARK", i, parked))

    def interleave(self, fn, *args, batcher=None, **kwargs):
        fn_name = fn if isinstance(fn, str) else fn.__name__
        interleaver = self.interleaver
        interleaver.mediators = self._edits + interleaver.mediators
        result = None
        try:
            with interleaver:
                mediators = interleaver.mediators
                invokes = batcher.invokes if batcher is not None else [(args, {})]
                connection.send(("INTERLEAVE", fn_name, [m.pending for m in mediators],
                                 [m.batch_group for m in mediators], invokes, kwargs))
                result = interleaver.pump()
        except EarlyStopException:
            pass
        finally:
            interleaver.cancel()
        return result

    Envoy.interleave = interleave

    persistent = dict(meta._remoteable_persistent_objects())

    class RunnerUnpickler(CustomCloudUnpickler):
        """Module references resolve to the meta build; the interleaver to the socket one."""

        def persistent_load(self, pid):
            if pid == "Interleaver":
                return RunnerInterleaver()
            return persistent.get(pid)

    def handle(sock):
        nonlocal connection
        connection = Channel(sock)
        blob, compress, dtype_name, _seed, env = connection.recv()
        dtype = getattr(torch, dtype_name)
        try:
            meta._remoteable_set_env(env)
            tracer = RequestModel.deserialize(blob, persistent, compress=compress, unpickler=RunnerUnpickler)
            with autocast_bracket(dtype):
                saved = run_block(tracer)
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.items()},
                       buffer)
            info = {"all_meta": all(p.is_meta for p in meta._module.parameters()), "pid": os.getpid(),
                    "blocked_modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}
            connection.send(("END", buffer.getvalue(), info))
        except BaseException as error:  # noqa: BLE001 - report everything to the host
            connection.send(("EXCEPTION", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))

    # A warmed template (imports done, meta model built, no request run) forks one fresh runner
    # process per request, as NDIF's pool hands out a pre-warmed fresh runner per request.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(8)
    while True:
        sock, _ = server.accept()
        if os.fork() == 0:
            server.close()
            try:
                handle(sock)
            finally:
                sock.close()
                os._exit(0)
        sock.close()
        while True:  # reap finished runners
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


# =================================================================================================
# host: the model actor (real weights, the forward pass, one proxy per runner worker)
# =================================================================================================


class RunnerError(Exception):
    pass


def _proxy_class():
    from nnsight.intervention.interleaver import EarlyStopException, Event, Mediator, Pending

    class Proxy(Mediator):
        """The host half of one runner worker: nnsight's Mediator, switched over the socket."""

        def __init__(self, index, driver, park):
            super().__init__(None, {}, {})
            self.index, self.driver, self.first = index, driver, park

        def start(self, interleaver=None):
            self.interleaver = interleaver
            self.iteration = 0
            self.counts_at_start = dict(interleaver.counts) if interleaver is not None else {}
            self.caches, self.transform = [], None
            self.adopt(self.first)

        def adopt(self, park):
            if park is None:
                self.pending = None
                return
            event, location, pin, *rest = park
            self.iteration = pin
            occurrence = pin if pin is not None else self.occurrence(location)
            self.pending = Pending(event, location, occurrence, *rest)
            if event in (Event.SWAP, Event.SKIP):
                self.driver.count("writes", tensor_bytes(rest), location)

        @property
        def alive(self):
            return self.pending is not None

        def switch(self, *args):
            if args:
                self.driver.count("reads", tensor_bytes(args), self.pending.provider)
            self.driver.stats["round_trips"] += 1
            self.driver.channel.send(("RESUME", self.index, args, self.iteration))
            message = self.driver.next_event()
            if message[0] == "STOP":
                raise EarlyStopException()
            self.adopt(message[2])
            return self.pending

    return Proxy


class Driver:
    """Runs one request for one fresh runner."""

    def __init__(self, model, channel):
        self.model, self.channel = model, channel
        self.stats = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "round_trips": 0,
                      "input_bytes": 0, "result_bytes": 0, "log": []}

    def count(self, kind, nbytes, location):
        self.stats[kind] += 1
        self.stats[kind[:-1] + "_bytes"] += nbytes
        self.stats["log"].append([kind[:-1], location, nbytes])

    def next_event(self):
        message = self.channel.recv()
        if message[0] == "EXCEPTION":
            raise RunnerError(message[1])
        return message

    def run(self):
        while True:
            message = self.next_event()
            if message[0] == "INTERLEAVE":
                self.interleave(*message[1:])
            elif message[0] == "END":
                return message[1], message[2]

    def interleave(self, fn_name, parks, groups, invokes, kwargs):
        import torch
        from nnsight.util import apply

        model = self.model
        interleaver = model.interleaver
        proxies = [_proxy_class()(i, self, park) for i, park in enumerate(parks)]
        for proxy, group in zip(proxies, groups):
            proxy.batch_group = group
        self.stats["input_bytes"] += tensor_bytes(invokes)
        interleaver.mediators = proxies
        dtype = next(model._module.parameters()).dtype
        result = None
        try:
            with autocast_bracket(dtype), interleaver:
                fn = getattr(model, fn_name)
                batcher = model._batcher_class(model)
                for inputs, invoke_kwargs in invokes:
                    batcher.add(*inputs, **invoke_kwargs)
                args, assembled = batcher.assemble(fn)
                interleaver.batcher = batcher
                device = model.device
                args, call_kwargs = apply((args, {**assembled, **kwargs}), lambda t: t.to(device), torch.Tensor)
                with torch.no_grad():
                    result = fn(*args, **call_kwargs)
                interleaver.handle("result", result)
            for proxy in proxies:
                if proxy.alive:
                    self.channel.send(("THROW", proxy.index, str(proxy.pending), proxy.iteration != 0))
        finally:
            interleaver.mediators = []
            interleaver.batcher = None
        self.stats["result_bytes"] += tensor_bytes(result)
        self.channel.send(("DONE", result))


class Pool:
    """A runner template per checkpoint folder; each request gets a fresh process forked from it."""

    def __init__(self, folder):
        self.folder = folder
        self.template = None

    def acquire(self):
        if self.template is None:
            path = os.path.join(tempfile.mkdtemp(prefix="ngsb-"), "runner.sock")
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            env["OMP_NUM_THREADS"] = "1"  # the runner computes little; and a forked OpenMP pool can hang
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "runner", path, self.folder],
                                    env=env, cwd=os.path.dirname(path), stdout=sys.stderr)
            self.template = (proc, path)
        return self.template

    def close(self):
        if self.template is not None:
            self.template[0].kill()
            self.template[0].wait()


def _connect(proc, path, timeout=600.0):
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RunnerError(f"the runner exited during startup (code {proc.returncode})")
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _serve(model, pool, metadata):
    from nnsight.schema.request import RequestModel

    request = RequestModel.model_validate_json(metadata["metadata"])
    # As NDIF's model actor does before every request, on both paths: apply the request's
    # environment to the loaded model (the attention implementation the client resolved; a PEFT
    # adapter, injected in place). The runner applies the same dict to its weightless copy.
    model._remoteable_set_env(request.env)
    proc, path = pool.acquire()
    sock = _connect(proc, path)
    channel = Channel(sock)
    driver = Driver(model, channel)
    try:
        dtype = str(next(model._module.parameters()).dtype).removeprefix("torch.")
        channel.send((metadata["blob"], request.compress, dtype, None, request.env))
        saved, info = driver.run()
    finally:
        sock.close()
    if request.compress:
        import zstandard

        saved = zstandard.ZstdCompressor(level=3).compress(saved)
    driver.stats["wire_bytes"] = channel.wire_bytes
    info["host_env"] = {"attn_implementation": model.attn_implementation, "peft": model.peft}
    return saved, driver.stats, info


def host_main(argv):
    sys.meta_path.insert(0, Blocker())
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep the protocol stream clean of prints
    import torch
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, pools, templates = {}, {}, {}
    for item in argv:
        key, folder, dtype = item.split("=")
        module = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        module.to(os.environ.get("NNGRAFT_SANDBOX_DEVICE", "cpu"))  # cuda: NDIF's autocast bracket applies
        module.requires_grad_(False)
        models[key] = TransformersModel(module, tokenizer=AutoTokenizer.from_pretrained(folder),
                                        task="text-generation")
        pools[key] = templates.setdefault(folder, Pool(folder))
    write_frame(stdout, json.dumps({"ready": True, "models": sorted(models)}).encode())
    try:
        while True:
            header = read_frame(stdin)
            if header is None:
                return 0
            message = json.loads(header)
            message["blob"] = read_frame(stdin)
            try:
                result, stats, info = _serve(models[message["model"]], pools[message["model"]], message)
                reply = {"ok": True, "error": "", "stats": stats, "runner": info}
            except BaseException as error:  # noqa: BLE001 - report everything to the client
                result = b""
                text = str(error) if isinstance(error, RunnerError) else traceback.format_exc()
                reply = {"ok": False, "error": f"{type(error).__name__}: {text}", "stats": {}, "runner": {}}
            reply["host_blocked_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
            write_frame(stdout, json.dumps(reply).encode())
            write_frame(stdout, result)
    finally:
        for pool in templates.values():
            pool.close()


if __name__ == "__main__":  # only as a script: importing this file changes nothing
    if sys.argv[1] == "runner":
        runner_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(host_main(sys.argv[2:]))
