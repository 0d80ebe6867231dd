"""Fixtures: Python stubs generated from proto/ with grpcio-tools, and a
real sandboxd daemon on a free loopback port, called with the admin key it
generates in its state directory."""

import collections
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _generate_stubs(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    args = ["protoc", f"-I{REPO / 'proto'}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("grpcio-tools could not compile proto/")


@pytest.fixture(scope="session")
def pb():
    """The generated modules, as a namespace."""
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="sandboxd-pystubs-"))
    _generate_stubs(out_dir)
    sys.path.insert(0, str(out_dir))
    from sandbox.v1 import filesystem_pb2, process_pb2, sandbox_pb2, sandbox_pb2_grpc

    class Modules:
        sandbox = sandbox_pb2
        process = process_pb2
        fs = filesystem_pb2
        grpc = sandbox_pb2_grpc

    yield Modules
    shutil.rmtree(out_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


class RunningDaemon:
    """Where the daemon listens, its state directory and its admin key."""

    def __init__(self, target, state_dir, key):
        self.target, self.state_dir, self.key = target, state_dir, key


@pytest.fixture(scope="session")
def sandboxd():
    binary = os.environ.get("SANDBOXD_BIN", str(REPO / "target" / "debug" / "sandboxd"))
    state_dir = tempfile.mkdtemp(prefix="sandboxd-py-")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_API_KEYS"}
    proc = subprocess.Popen(
        [binary, "serve", "--backend", "jail", "--listen", f"127.0.0.1:{port}", "--state-dir", state_dir,
         "--metrics-listen", "off", "--pool-size", "1",
         "--rootfs-image", os.path.join(os.environ["SANDBOXD_GUEST_IMAGE_DIR"], "rootfs.ext4")],
        env=env,
    )
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as probe:
            grpc.channel_ready_future(probe).result(timeout=30)
        # Written before the daemon listens.
        key = pathlib.Path(state_dir, "api-key").read_text().strip()
        yield RunningDaemon(target, state_dir, key)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(sandboxd):
    """A channel to the daemon whose calls carry its admin key."""
    channel = grpc.insecure_channel(sandboxd.target, options=[("grpc.max_receive_message_length", 64 << 20)])
    yield grpc.intercept_channel(channel, _Bearer(sandboxd.key))
    channel.close()


@pytest.fixture
def stubs(pb, daemon):
    class Stubs:
        sandboxes = pb.grpc.SandboxesStub(daemon)
        processes = pb.grpc.ProcessesStub(daemon)
        files = pb.grpc.FilesStub(daemon)

    return Stubs


@pytest.fixture
def sandbox_id(pb, stubs):
    created = stubs.sandboxes.Create(pb.sandbox.CreateSandboxRequest())
    yield created.id
    try:
        stubs.sandboxes.Delete(pb.sandbox.DeleteSandboxRequest(id=created.id))
    except grpc.RpcError:
        pass


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
