"""Access control as seen through the official E2B Python SDK.

This module starts its own daemon (module-scoped), sets an access token on it
with ``POST /init`` the way the control plane does, and talks to it with SDK
sandboxes built with and without that token. The token never reaches the
session daemon the other e2e tests use.

The SDK only sends a token when the control plane gave it one, which never
happens in debug mode, so the sandboxes are built with the (deprecated)
constructor, passing ``envd_access_token`` and the ``X-Access-Token`` header.
"""

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest
from packaging.version import Version

from e2b import AuthenticationException, ConnectionConfig, Sandbox

from conftest import kill_keepers, DEFAULT_ENVD_BIN, READY_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, _read_ready_line

TOKEN = f"e2e-token-{uuid.uuid4().hex}"
# Every feature gate open, and no implicit "user" username (that is for envd < 0.4.0).
ENVD_VERSION = Version("0.6.13")


def _post_init(base_url: str, body: dict) -> int:
    request = urllib.request.Request(
        f"{base_url}/init",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def secured_url(tmp_path_factory):
    """A daemon of this module's own, with TOKEN set through POST /init."""
    binary = Path(os.environ.get("ENVD_BIN", DEFAULT_ENVD_BIN))
    if not binary.is_file():
        raise RuntimeError(f"envd binary not found at {binary}; build it or set ENVD_BIN")
    scratch = tmp_path_factory.mktemp("envd-auth")
    log_path = scratch / "envd.stderr.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "--addr", "127.0.0.1",
            "--port", "0",
            # /init must not touch the machine's clock or trust store.
            "--set-clock", "false",
            "--ca-bundle-file", str(scratch / "ca-certificates.crt"),
            "--ca-cert-file", str(scratch / "e2b-ca.crt"),
            # Its own state: daemons must not share a state directory.
            "--state-dir", str(scratch / "state"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = _read_ready_line(proc, READY_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"envd exited before listening: {log_path.read_text(errors='replace')}")
        ready = json.loads(line)
        assert ready["event"] == "listening", ready
        base_url = f"http://{ready['addr']}"
        assert _post_init(base_url, {"accessToken": TOKEN}) == 204
    except BaseException:
        proc.kill()
        proc.wait()
        log.close()
        raise

    yield base_url

    proc.send_signal(signal.SIGTERM)
    kill_keepers(scratch / "state")
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    finally:
        proc.stdout.close()
        log.close()
    assert code == 0, log_path.read_text(errors="replace")[-4000:]


def _sandbox(base_url: str, token) -> Sandbox:
    headers = {"E2b-Sandbox-Id": "local", "E2b-Sandbox-Port": "49983"}
    if token is not None:
        headers["X-Access-Token"] = token
    return Sandbox(
        sandbox_id="local",
        sandbox_domain=None,
        envd_version=ENVD_VERSION,
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=ConnectionConfig(
            debug=True, sandbox_url=base_url, extra_sandbox_headers=headers
        ),
    )


@pytest.fixture(scope="module")
def with_token(secured_url):
    return _sandbox(secured_url, TOKEN)


@pytest.fixture(scope="module")
def without_token(secured_url):
    return _sandbox(secured_url, None)


def _get(url: str):
    """(status, body) of a plain GET, with no SDK and no token header."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post_file(url: str, name: str, data: bytes):
    """(status, body) of a multipart upload, as a browser form would send it."""
    response = httpx.post(url, files={"file": (name, data)}, timeout=10)
    return response.status_code, response.content


def test_the_sdk_with_the_token_writes_reads_and_lists(with_token, workdir):
    path = f"{workdir}/sub/hello.txt"
    info = with_token.files.write(path, "hello, token")
    assert info.path == path
    assert with_token.files.read(path) == "hello, token"
    with open(path) as f:
        assert f.read() == "hello, token"
    names = [entry.name for entry in with_token.files.list(f"{workdir}/sub")]
    assert names == ["hello.txt"]
    assert with_token.files.exists(path)
    assert with_token.files.make_dir(f"{workdir}/made")
    assert os.path.isdir(f"{workdir}/made")
    assert with_token.is_running()


def test_signed_urls_work_without_the_token(with_token, workdir):
    path = f"{workdir}/signed file.txt"

    upload = with_token.upload_url(path)
    assert TOKEN not in upload and "signature=v1_" in upload
    status, body = _post_file(upload, "signed file.txt", b"uploaded by URL")
    assert status == 200, body
    with open(path, "rb") as f:
        assert f.read() == b"uploaded by URL"

    download = with_token.download_url(path)
    assert _get(download) == (200, b"uploaded by URL")

    # With an expiration still ahead.
    assert _get(with_token.download_url(path, use_signature_expiration=120)) == (
        200,
        b"uploaded by URL",
    )
    status, _ = _post_file(with_token.upload_url(path, use_signature_expiration=120), "x", b"again")
    assert status == 200

    # Expired URLs are refused.
    status, body = _get(with_token.download_url(path, use_signature_expiration=-30))
    assert status == 401
    assert json.loads(body)["message"] == "signature is already expired"
    status, _ = _post_file(with_token.upload_url(path, use_signature_expiration=-30), "x", b"late")
    assert status == 401
    with open(path, "rb") as f:
        assert f.read() == b"again"

    # A URL for one path does not open another.
    other = download.replace("signed%20file.txt", "other.txt")
    assert other != download
    status, body = _get(other)
    assert status == 401
    assert json.loads(body)["message"] == "invalid signature"

    # Without any signature, /files is closed.
    status, _ = _get(download.split("&signature=")[0])
    assert status == 401


def test_the_sdk_without_the_token_is_refused(without_token, with_token, workdir):
    path = f"{workdir}/guarded.txt"
    with_token.files.write(path, "guarded")

    # Filesystem RPCs (Connect unary).
    with pytest.raises(AuthenticationException):
        without_token.files.list(workdir)
    with pytest.raises(AuthenticationException):
        without_token.files.get_info(path)
    with pytest.raises(AuthenticationException):
        without_token.files.make_dir(f"{workdir}/nope")
    assert not os.path.exists(f"{workdir}/nope")
    # Process RPCs: a server stream (Start) and a unary call (List).
    with pytest.raises(AuthenticationException):
        without_token.commands.run("true")
    with pytest.raises(AuthenticationException):
        without_token.commands.list()
    # /files without the header and without a signature.
    with pytest.raises(AuthenticationException):
        without_token.files.read(path)
    with pytest.raises(AuthenticationException):
        without_token.files.write(path, "overwritten")
    with open(path) as f:
        assert f.read() == "guarded"

    # /health stays open: the SDK still sees the sandbox running.
    assert without_token.is_running()


def test_a_wrong_token_is_refused(secured_url, workdir):
    wrong = _sandbox(secured_url, "not-the-token")
    with pytest.raises(AuthenticationException):
        wrong.files.list(workdir)
    with pytest.raises(AuthenticationException):
        wrong.files.read(f"{workdir}/anything.txt")
    # URLs signed with the wrong token are refused too.
    status, _ = _get(wrong.download_url(f"{workdir}/anything.txt"))
    assert status == 401


def test_the_token_cannot_be_changed_or_cleared(secured_url, with_token, workdir):
    assert _post_init(secured_url, {"accessToken": "hijack"}) == 401
    assert _post_init(secured_url, {}) == 401
    assert _post_init(secured_url, {"accessToken": TOKEN}) == 204
    # Still the same token in force.
    with_token.files.write(f"{workdir}/still.txt", "ok")
    assert with_token.files.read(f"{workdir}/still.txt") == "ok"
