# Kernel driver of sandbox-agent's code contexts, for Jupyter kernels
# (ipykernel for python, bash_kernel for bash). The agent starts it as
#   python3 -c <this file> python|bash EVENT_FD
# It starts the kernel on unix sockets in a private directory, reads
# requests on stdin (one JSON object a line: {"execute": {"code", "env"}}
# or {"interrupt": true}) and writes events to EVENT_FD, one JSON object a
# line: ready, stdout, stderr, count, result, error, return, done.
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

KERNEL_MODULES = {"python": "ipykernel_launcher", "bash": "bash_kernel"}
language = sys.argv[1]
for needed in ("jupyter_client", KERNEL_MODULES[language]):
    if importlib.util.find_spec(needed) is None:
        sys.exit(f"{needed} is not installed in this sandbox's image: use the full image (scripts/guest-image.sh full)")

from jupyter_client import BlockingKernelClient  # noqa: E402
from jupyter_client.connect import write_connection_file  # noqa: E402

RETURN_MIME = "application/vnd.sandbox.return+json"
# Lets python cells hand a JSON value back with __return__(value).
PYTHON_SETUP = """
def __sandbox_setup():
    import builtins, json
    from IPython.display import publish_display_data
    def __return__(value):
        publish_display_data({%r: json.dumps(value)})
    builtins.__return__ = __return__
__sandbox_setup()
del __sandbox_setup
""" % RETURN_MIME

events = os.fdopen(int(sys.argv[2]), "w", buffering=1, encoding="utf-8", errors="replace")
emit_lock = threading.Lock()
kernel = None


def emit(kind, value):
    line = json.dumps({kind: value}, ensure_ascii=False)
    with emit_lock:
        events.write(line + "\n")
        events.flush()


def start_kernel(directory):
    connection = os.path.join(directory, "kernel.json")
    write_connection_file(connection, transport="ipc", ip=os.path.join(directory, "k"))
    module = KERNEL_MODULES[language]
    argv = [sys.executable, "-m", module, "-f", connection]
    if language == "python":
        argv += ["--InteractiveShell.colors=NoColor", "--HistoryManager.enabled=False"]
    log_path = os.path.join(directory, "kernel.log")
    with open(log_path, "wb") as log:
        kernel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    client = BlockingKernelClient(connection_file=connection)
    client.load_connection_file()
    # No heartbeat: a kernel slow to start (bash_kernel waits for its
    # shell) would count as dead. Whether it lives is the process's word.
    client.start_channels(hb=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.wait_for_ready(timeout=2)
            return kernel, client
        except RuntimeError:
            if kernel.poll() is None and time.monotonic() < deadline:
                continue
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - 4096))
            said = log.read().decode("utf-8", "replace")
        sys.exit(f"the kernel did not start ({'it exited' if kernel.poll() is not None else 'no answer in 120 s'}): {said}")


def env_code(env):
    """Code that sets `env` for one cell, and code that puts it back."""
    if not env:
        return None, None
    if language == "python":
        names = json.dumps(sorted(env))
        before = (
            "import os as __sb_os\n"
            f"__sb_saved = {{k: __sb_os.environ.get(k) for k in {names}}}\n"
            f"__sb_os.environ.update({json.dumps(env)})\n"
        )
        after = (
            "for __sb_k, __sb_v in __sb_saved.items():\n"
            "    if __sb_v is None: __sb_os.environ.pop(__sb_k, None)\n"
            "    else: __sb_os.environ[__sb_k] = __sb_v\n"
            "del __sb_os, __sb_saved, __sb_k, __sb_v\n"
        )
        return before, after
    quoted = {name: "'" + value.replace("'", "'\\''") + "'" for name, value in env.items()}
    names = " ".join(sorted(env))
    before = f"__sb_saved=$(declare -p {names} 2>/dev/null); " + "; ".join(f"export {n}={v}" for n, v in quoted.items())
    after = f'unset {names}; eval "$__sb_saved"; unset __sb_saved'
    return before, after


def run_quietly(client, code):
    msg_id = client.execute(code, silent=True, store_history=False)
    wait_idle(client, msg_id, lambda message: None)


def next_message(get):
    """The next message of a channel; exits when the kernel has died."""
    while True:
        try:
            return get(timeout=1)
        except queue.Empty:
            if kernel.poll() is not None:
                emit("error", {"name": "KernelDied", "value": f"the kernel exited ({kernel.returncode})", "traceback": ""})
                emit("done", {})
                os._exit(1)


def wait_idle(client, msg_id, handle):
    while True:
        message = next_message(client.get_iopub_msg)
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "status" and message["content"].get("execution_state") == "idle":
            break
        handle(message)
    while True:
        reply = next_message(client.get_shell_msg)
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            return reply


def forward(message):
    kind, content = message["msg_type"], message["content"]
    if kind == "stream":
        emit("stdout" if content.get("name") == "stdout" else "stderr", content.get("text", ""))
    elif kind == "execute_input":
        emit("count", content.get("execution_count", 0))
    elif kind in ("execute_result", "display_data", "update_display_data"):
        data = content.get("data", {})
        if RETURN_MIME in data:
            emit("return", data[RETURN_MIME])
            return
        bundle = {mime: value if isinstance(value, str) else json.dumps(value) for mime, value in data.items()}
        emit("result", {"data": bundle, "main": kind == "execute_result"})
    elif kind == "error":
        name = content.get("ename", "") or ("Error" if language == "bash" else "")
        emit("error", {"name": name, "value": content.get("evalue", ""), "traceback": "\n".join(content.get("traceback", []))})


def execute(client, request, return_file):
    before, after = env_code(request.get("env") or {})
    if before:
        run_quietly(client, before)
    msg_id = client.execute(request["code"], store_history=True, allow_stdin=False, stop_on_error=False)
    reply = wait_idle(client, msg_id, forward)
    if reply["content"].get("status") in ("abort", "aborted"):
        # bash_kernel answers an interrupt so, without an error of its own.
        emit("error", {"name": "KeyboardInterrupt", "value": "the cell was interrupted", "traceback": ""})
    if after:
        run_quietly(client, after)
    if return_file and os.path.exists(return_file):
        with open(return_file, encoding="utf-8", errors="replace") as file:
            emit("return", file.read(1 << 20))
        os.remove(return_file)


def main():
    global kernel
    directory = tempfile.mkdtemp(prefix=".sandbox-kernel-")
    kernel, client = start_kernel(directory)
    return_file = None
    if language == "python":
        run_quietly(client, PYTHON_SETUP)
    else:
        return_file = os.path.join(directory, "return")
        run_quietly(client, f"__return__() {{ printf '%s' \"$1\" > '{return_file}'; }}")
    emit("ready", {"pid": kernel.pid})
    requests = []
    ready = threading.Condition()

    def read_requests():
        for line in sys.stdin:
            request = json.loads(line)
            if "interrupt" in request:
                os.kill(kernel.pid, signal.SIGINT)
                continue
            with ready:
                requests.append(request["execute"])
                ready.notify()
        os.kill(kernel.pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=read_requests, daemon=True).start()
    while True:
        with ready:
            while not requests:
                ready.wait()
            request = requests.pop(0)
        execute(client, request, return_file)
        emit("done", {})


main()
