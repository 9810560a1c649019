"""The E2B SDK re-attaching to a command across a daemon crash.

A command is started through the SDK, the daemon is killed with SIGKILL, a new daemon
starts on the same state directory and port, and the SDK's ``commands.connect`` finds the
command (kept alive by its keeper), feeds it input and gets its output and exit code.
"""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox

from conftest import DEFAULT_ENVD_BIN, READY_TIMEOUT_S, _read_ready_line, kill_keepers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(binary: Path, port: int, state: Path, log) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(binary), "--addr", "127.0.0.1", "--port", str(port), "--state-dir", str(state)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    line = _read_ready_line(proc, READY_TIMEOUT_S)
    assert '"listening"' in line, line
    return proc


def test_commands_connect_finds_a_command_started_before_a_crash(tmp_path):
    binary = Path(os.environ.get("ENVD_BIN", DEFAULT_ENVD_BIN))
    port = _free_port()
    state = tmp_path / "state"
    log = open(tmp_path / "envd.log", "wb")
    first = _start(binary, port, state, log)
    second = None
    try:
        saved = {key: os.environ.get(key) for key in ("E2B_SANDBOX_URL", "E2B_DEBUG", "E2B_CONNECTION_RETRIES")}
        os.environ.update(
            E2B_SANDBOX_URL=f"http://127.0.0.1:{port}", E2B_DEBUG="true", E2B_CONNECTION_RETRIES="0"
        )
        try:
            sbx = Sandbox.create()
            handle = sbx.commands.run("read line; echo got $line; exit 3", background=True, stdin=True, timeout=0)
            pid = handle.pid
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)

            second = _start(binary, port, state, log)
            listed = {p.pid: p for p in sbx.commands.list()}
            assert pid in listed, f"the command survives the crash: {listed}"
            assert listed[pid].args[-1] == "read line; echo got $line; exit 3"

            again = sbx.commands.connect(pid, timeout=0)
            sbx.commands.send_stdin(pid, "back\n")
            with pytest.raises(CommandExitException) as raised:
                again.wait()
            assert raised.value.exit_code == 3
            assert raised.value.stdout == "got back\n"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        kill_keepers(state)
        log.close()
