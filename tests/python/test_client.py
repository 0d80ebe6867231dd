"""The sandbox.v1 API driven from a Python client generated with grpcio-tools."""

import hashlib
import json
import queue

import grpc
import pytest

from conftest import wait_until


def run(pb, stubs, sandbox_id, argv, **fields):
    out, err, exit_status = b"", b"", None
    for event in stubs.processes.Exec(pb.process.ExecRequest(sandbox_id=sandbox_id, argv=argv, **fields)):
        kind = event.WhichOneof("event")
        if kind == "stdout":
            out += event.stdout
        elif kind == "stderr":
            err += event.stderr
        elif kind == "exit":
            exit_status = event.exit
    return out, err, exit_status


def test_exec_separates_streams_and_exit_code(pb, stubs, sandbox_id):
    out, err, status = run(pb, stubs, sandbox_id, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, status.code) == (b"out\n", b"err\n", 3)


def test_stdin_and_timeout(pb, stubs, sandbox_id):
    out, _, status = run(pb, stubs, sandbox_id, ["cat"], stdin=b"piped")
    assert (out, status.code) == (b"piped", 0)
    _, _, status = run(pb, stubs, sandbox_id, ["sleep", "100"], timeout_ms=300)
    assert status.timed_out and status.WhichOneof("outcome") == "signal"


def test_pty_session(pb, stubs, sandbox_id):
    requests = queue.Queue()
    start = pb.process.ConnectStart(
        process=pb.process.ExecRequest(sandbox_id=sandbox_id, argv=["sh"]),
        pty=pb.process.PtySize(rows=24, cols=80),
    )
    requests.put(pb.process.ConnectRequest(start=start))
    requests.put(pb.process.ConnectRequest(stdin=b"tty\n"))
    requests.put(pb.process.ConnectRequest(resize=pb.process.PtySize(rows=33, cols=101)))
    requests.put(pb.process.ConnectRequest(stdin=b"stty size; exit 5\n"))
    requests.put(None)
    screen, status = b"", None
    for event in stubs.processes.Connect(iter(requests.get, None)):
        if event.WhichOneof("event") == "stdout":
            screen += event.stdout
        elif event.WhichOneof("event") == "exit":
            status = event.exit
    assert b"/dev/pts/" in screen
    assert b"33 101" in screen
    assert status.code == 5


def test_upload_download_stat_list_remove(pb, stubs, sandbox_id):
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB
    chunk = 1 << 20

    def parts():
        yield pb.fs.UploadRequest(header=pb.fs.UploadHeader(sandbox_id=sandbox_id, path="/home/user/data.bin"))
        for offset in range(0, len(payload), chunk):
            yield pb.fs.UploadRequest(data=payload[offset:offset + chunk])

    info = stubs.files.Upload(parts())
    assert info.size == len(payload)
    digest = hashlib.sha256()
    for piece in stubs.files.Download(pb.fs.DownloadRequest(sandbox_id=sandbox_id, path="/home/user/data.bin")):
        digest.update(piece.data)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()

    stat = stubs.files.Stat(pb.fs.StatRequest(sandbox_id=sandbox_id, path="/home/user/data.bin"))
    assert stat.type == pb.fs.FILE_TYPE_FILE and stat.size == len(payload)
    listing = stubs.files.List(pb.fs.ListRequest(sandbox_id=sandbox_id, path="/home/user", depth=1))
    assert "/home/user/data.bin" in [entry.path for entry in listing.entries]
    stubs.files.Remove(pb.fs.RemoveRequest(sandbox_id=sandbox_id, path="/home/user/data.bin"))
    with pytest.raises(grpc.RpcError) as gone:
        stubs.files.Stat(pb.fs.StatRequest(sandbox_id=sandbox_id, path="/home/user/data.bin"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_run_code_returns_values(pb, stubs, sandbox_id):
    python = stubs.processes.RunCode(pb.process.RunCodeRequest(
        sandbox_id=sandbox_id, language=pb.process.LANGUAGE_PYTHON,
        code="print('hi')\n__return__({'sum': sum(range(10))})\n"))
    assert python.stdout == b"hi\n"
    assert json.loads(python.result_json) == {"sum": 45}
    sh = stubs.processes.RunCode(pb.process.RunCodeRequest(
        sandbox_id=sandbox_id, language=pb.process.LANGUAGE_SH, code="__return__ '{\"ok\": true}'\n"))
    assert json.loads(sh.result_json) == {"ok": True}


def test_errors_carry_codes_and_fixes(pb, stubs):
    with pytest.raises(grpc.RpcError) as missing:
        stubs.sandboxes.Get(pb.sandbox.GetSandboxRequest(id="sb-missing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "List" in missing.value.details()


def test_delete_and_ttl(pb, stubs):
    short = stubs.sandboxes.Create(pb.sandbox.CreateSandboxRequest(limits=pb.sandbox.Limits(timeout_seconds=1)))
    kept = stubs.sandboxes.Create(pb.sandbox.CreateSandboxRequest())
    stubs.sandboxes.Delete(pb.sandbox.DeleteSandboxRequest(id=kept.id))
    ids = [s.id for s in stubs.sandboxes.List(pb.sandbox.ListSandboxesRequest()).sandboxes]
    assert kept.id not in ids

    def expired():
        try:
            stubs.sandboxes.Get(pb.sandbox.GetSandboxRequest(id=short.id))
            return False
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND

    assert wait_until(expired), "the sandbox outlived its TTL"
