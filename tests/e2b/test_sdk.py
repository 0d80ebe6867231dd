"""The official `e2b` Python SDK, unmodified, against sandboxd's E2B front door
(pointed at it with E2B_API_URL and E2B_SANDBOX_URL only)."""

import threading
import time
import urllib.error
import urllib.request

import e2b
import pytest
from e2b import CommandExitException, Sandbox

NOT_FOUND = getattr(e2b, "FileNotFoundException", e2b.NotFoundException)


@pytest.fixture(scope="module")
def sbx(daemon):
    sandbox = Sandbox.create(envs={"GREETING": "hello from env"}, metadata={"suite": "e2b-sdk"}, timeout=300)
    yield sandbox
    sandbox.kill()


def test_create_applies_env_vars_and_metadata(sbx):
    assert sbx.commands.run("echo $GREETING").stdout == "hello from env\n"
    assert sbx.get_info().metadata == {"suite": "e2b-sdk"}


def test_run_gives_stdout_stderr_and_exit_code(sbx):
    result = sbx.commands.run("echo out; echo err >&2; pwd; id -un")
    assert result.exit_code == 0
    assert result.stdout == "out\n/home/user\nuser\n"
    assert result.stderr == "err\n"
    assert sbx.commands.run("id -un", user="root").stdout == "root\n"


def test_non_zero_exit_raises_the_sdk_exception(sbx):
    with pytest.raises(CommandExitException) as raised:
        sbx.commands.run("echo partial; exit 3")
    assert raised.value.exit_code == 3
    assert raised.value.stdout == "partial\n"


def test_a_command_past_its_timeout_is_killed(sbx):
    with pytest.raises(e2b.TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)


def test_background_command_streams_stdout(sbx):
    handle = sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.2; done", background=True)
    seen = []
    result = handle.wait(on_stdout=seen.append)
    assert "".join(seen) == "line1\nline2\nline3\n"
    assert result.exit_code == 0


def test_list_and_kill_processes(sbx):
    handle = sbx.commands.run("sleep 120", background=True)
    assert handle.pid in [process.pid for process in sbx.commands.list()]
    assert sbx.commands.kill(handle.pid) is True
    deadline = time.monotonic() + 10
    while handle.pid in [process.pid for process in sbx.commands.list()]:
        assert time.monotonic() < deadline, "the killed process is still listed"
        time.sleep(0.1)
    assert sbx.commands.kill(handle.pid) is False


def test_a_command_survives_disconnect_and_is_reattached(sbx):
    handle = sbx.commands.run("sleep 1; echo after", background=True)
    handle.disconnect()
    again = sbx.commands.connect(handle.pid)
    assert again.wait().stdout == "after\n"


def test_stdin_reaches_a_background_command(sbx):
    handle = sbx.commands.run("head -n1", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "typed\n")
    assert handle.wait().stdout == "typed\n"


def test_pty_reports_its_size_after_a_resize(sbx):
    from e2b import PtySize

    output = bytearray()
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(handle.pid, PtySize(rows=33, cols=111))
    sbx.pty.send_stdin(handle.pid, b"stty size; exit\n")
    handle.wait(on_pty=output.extend)
    assert b"33 111" in bytes(output)


def test_files_round_trip(sbx):
    files = sbx.files
    files.write("/home/user/notes/a.txt", "first")
    assert files.read("/home/user/notes/a.txt") == "first"
    assert "a.txt" in [entry.name for entry in files.list("/home/user/notes")]
    assert files.exists("/home/user/notes/a.txt")
    assert files.make_dir("/home/user/made") is True
    assert files.make_dir("/home/user/made") is False
    files.rename("/home/user/notes/a.txt", "/home/user/made/b.txt")
    assert not files.exists("/home/user/notes/a.txt")
    assert files.read("/home/user/made/b.txt") == "first"
    files.remove("/home/user/made")
    assert not files.exists("/home/user/made")


def test_a_5_mib_binary_round_trip(sbx):
    data = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    sbx.files.write("/tmp/blob.bin", data)
    assert bytes(sbx.files.read("/tmp/blob.bin", format="bytes")) == data
    assert sbx.commands.run("stat -c %s /tmp/blob.bin").stdout.strip() == str(len(data))


def test_a_missing_file_raises_not_found(sbx):
    with pytest.raises(NOT_FOUND):
        sbx.files.read("/home/user/does-not-exist")
    assert sbx.files.exists("/home/user/does-not-exist") is False


def test_watching_a_directory_sees_changes(sbx):
    sbx.files.make_dir("/home/user/watched")
    watcher = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/new.txt", "x")
    deadline = time.monotonic() + 10
    names = set()
    while "new.txt" not in names:
        assert time.monotonic() < deadline, f"no event for new.txt (saw {names})"
        names |= {event.name for event in watcher.get_new_events()}
        time.sleep(0.1)
    watcher.stop()


def test_timeout_info_and_list(sbx, daemon):
    sbx.set_timeout(900)
    info = sbx.get_info()
    assert 850 <= (info.end_at - info.started_at).total_seconds() <= 1000 + 300
    listed = Sandbox.list()
    items = listed.next_items() if hasattr(listed, "next_items") else listed
    assert sbx.sandbox_id in [item.sandbox_id for item in items]


def test_another_key_is_refused(sbx, daemon):
    with pytest.raises(Exception):
        Sandbox.connect(sbx.sandbox_id, api_key=daemon.other_key)
    assert Sandbox.kill(sbx.sandbox_id, api_key=daemon.other_key) is False
    with pytest.raises(e2b.AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)


def _get(url, headers, timeout=2):
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def test_a_service_in_the_sandbox_is_reached_through_the_data_plane(sbx, daemon):
    sbx.files.write("/home/user/site/index.html", "<p>served from the sandbox</p>")
    sbx.commands.run("cd /home/user/site && python3 -m http.server 8080", background=True)
    by_header = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080", "X-API-KEY": daemon.key}
    deadline = time.monotonic() + 20
    while True:
        try:
            status, body = _get(daemon.url + "/index.html", by_header)
            break
        except urllib.error.HTTPError as error:
            assert error.code == 502 and time.monotonic() < deadline, f"the service never answered: {error.code}"
            time.sleep(0.2)
    assert (status, body) == (200, b"<p>served from the sandbox</p>")
    by_host = {"Host": sbx.get_host(8080), "X-API-KEY": daemon.key}
    assert _get(daemon.url + "/index.html", by_host)[1] == b"<p>served from the sandbox</p>"
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(daemon.url + "/index.html", {"Host": sbx.get_host(8080)})
    assert refused.value.code == 401


def test_kill_ends_the_sandbox(daemon):
    sandbox = Sandbox.create()
    assert sandbox.is_running()
    sandbox.kill()
    assert not sandbox.is_running()
    with pytest.raises(Exception):
        sandbox.commands.run("true")
    assert Sandbox.kill(sandbox.sandbox_id) is False


def test_metrics_report_the_sandboxs_memory(sbx):
    sample = sbx.get_metrics()[-1]
    assert sample.cpu_count >= 1 and sample.mem_total >= sample.mem_used > 0
    assert sample.disk_total > 0


def test_gzip_and_streamed_uploads(sbx):
    import inspect
    import io

    if "gzip" not in inspect.signature(sbx.files.write).parameters:
        pytest.skip("this SDK version has no gzip or octet-stream uploads")
    data = b"compressible " * 100_000
    sbx.files.write("/tmp/gz.txt", data, gzip=True)
    sbx.files.write("/tmp/stream.txt", io.BytesIO(data))
    for path in ("/tmp/gz.txt", "/tmp/stream.txt"):
        assert bytes(sbx.files.read(path, format="bytes")) == data


def test_pause_then_connect_resumes_with_files_intact(daemon):
    sandbox = Sandbox.create()
    try:
        sandbox.files.write("/home/user/kept.txt", "still here")
        pause = getattr(sandbox, "pause", None) or sandbox.beta_pause
        pause()
        assert sandbox.get_info().state.value == "paused"
        again = Sandbox.connect(sandbox.sandbox_id)
        assert again.get_info().state.value == "running"
        assert again.commands.run("cat /home/user/kept.txt").stdout == "still here"
    finally:
        sandbox.kill()
