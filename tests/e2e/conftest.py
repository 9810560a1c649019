"""Fixtures for driving the official E2B Python SDK against our envd binary.

The daemon is started once per test session with ``--port 0``; the SDK is
pointed at it through its debug mode (``E2B_DEBUG=true`` +
``E2B_SANDBOX_URL``), in which ``Sandbox.create()`` makes no HTTP call and
every filesystem / process call goes straight to the daemon.

Environment:
    ENVD_BIN  path of the daemon binary (default: <repo>/target/release/envd)
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from e2b import Sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ENVD_BIN = REPO_ROOT / "target" / "release" / "envd"

READY_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30

# The daemon runs as root and its default user is root, so relative paths
# resolve against root's home directory.
HOME = "/root"


def kill_keepers(state_dir: Path) -> None:
    """Kill the daemon's process keepers (their processes die with them)."""
    needle = str(state_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "__keeper" in cmdline and needle in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _read_ready_line(proc: subprocess.Popen, timeout: float) -> str:
    """Block until the daemon prints its first stdout line (or the timeout)."""
    lines: "queue.Queue[str]" = queue.Queue(maxsize=1)

    def reader() -> None:
        lines.put(proc.stdout.readline())

    threading.Thread(target=reader, name="envd-ready-reader", daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"envd did not print its ready line within {timeout}s")


@pytest.fixture(scope="session")
def envd_url(tmp_path_factory):
    """Start the daemon, point the SDK at it, yield its base URL."""
    binary = Path(os.environ.get("ENVD_BIN", DEFAULT_ENVD_BIN))
    if not binary.is_file():
        raise RuntimeError(
            f"envd binary not found at {binary}; build it (cargo build --release) "
            "or set ENVD_BIN"
        )

    scratch = tmp_path_factory.mktemp("envd")
    log_path = scratch / "envd.stderr.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        # Its own state directory: daemons must not share one.
        [str(binary), "--port", "0", "--state-dir", str(scratch / "state")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = _read_ready_line(proc, READY_TIMEOUT_S)
        if not line:
            raise RuntimeError(
                f"envd exited before listening (exit code {proc.wait()}); "
                f"stderr: {log_path.read_text(errors='replace')}"
            )
        ready = json.loads(line)
        assert ready["event"] == "listening", ready
        port = int(ready["addr"].rsplit(":", 1)[1])
        assert port > 0, ready
    except BaseException:
        proc.kill()
        proc.wait()
        log.close()
        raise

    base_url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("E2B_DEBUG", "E2B_SANDBOX_URL", "E2B_CONNECTION_RETRIES")}
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = base_url
    os.environ["E2B_CONNECTION_RETRIES"] = "0"

    yield base_url

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        # Process keepers outlive the daemon by design; the session's must not outlive it.
        kill_keepers(scratch / "state")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(f"envd did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM")
    proc.stdout.close()
    log.close()
    assert code == 0, (
        f"envd exited with {code} after SIGTERM; stderr: "
        f"{log_path.read_text(errors='replace')[-4000:]}"
    )


@pytest.fixture
def workdir():
    """A fresh, empty directory under /tmp, removed after the test."""
    path = tempfile.mkdtemp(prefix="envd-e2e-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home_name():
    """A unique name relative to root's home (/root); removed after the test."""
    name = f"envd-e2e-{uuid.uuid4().hex[:12]}"
    yield name
    target = os.path.join(HOME, name)
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target, ignore_errors=True)
    elif os.path.lexists(target):
        os.remove(target)


@pytest.fixture
def sandbox(envd_url):
    """A debug-mode SDK sandbox talking to the daemon (no cloud call)."""
    sbx = Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx
