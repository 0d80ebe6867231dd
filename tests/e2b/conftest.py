"""Fixtures for the E2B SDK suite: a real sandboxd (jail backend) serving the
E2B API on a free loopback port, with two API keys in E2B's key format, and the
SDK pointed at it by E2B_API_URL and E2B_SANDBOX_URL alone."""

import os
import pathlib
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, url, key, other_key):
        self.url, self.key, self.other_key = url, key, other_key


@pytest.fixture(scope="session")
def daemon():
    binary = os.environ.get("SANDBOXD_BIN", str(REPO / "target" / "debug" / "sandboxd"))
    state_dir = tempfile.mkdtemp(prefix="sandboxd-e2b-")
    key, other_key = f"e2b_{secrets.token_hex(20)}", f"e2b_{secrets.token_hex(20)}"
    grpc_port, e2b_port = _free_port(), _free_port()
    env = dict(os.environ, SANDBOXD_API_KEYS=f"{key},{other_key}")
    proc = subprocess.Popen(
        [binary, "serve", "--backend", "jail", "--listen", f"127.0.0.1:{grpc_port}",
         "--e2b-listen", f"127.0.0.1:{e2b_port}", "--state-dir", state_dir, "--metrics-listen", "off",
         "--pool-size", "2", "--on-stop", "delete",
         "--rootfs-image", os.path.join(os.environ["SANDBOXD_GUEST_IMAGE_DIR"], "rootfs.ext4")],
        env=env,
    )
    url = f"http://127.0.0.1:{e2b_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sandboxd did not start serving the E2B API within 60 s")
                time.sleep(0.2)
        os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key, E2B_DOMAIN=f"localhost:{e2b_port}")
        yield Daemon(url, key, other_key)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
