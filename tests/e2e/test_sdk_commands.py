"""Process behaviour of envd as seen through the official E2B Python SDK.

Every test drives the daemon only through the SDK's public commands / PTY API
(``sandbox.commands``, ``sandbox.pty``) and checks the real outcome: the output
and exit code the SDK reports, and the processes and files on this machine
(``/proc``, ``os.stat``).

No test sleeps to let time pass. Waiting is done with the SDK's own blocking
calls (``wait()``), with callbacks that set a ``threading.Event`` /
``threading.Condition`` under a timeout, or with a bounded poll of an
observable condition (``wait_until``) that fails at a hard deadline.
"""

import asyncio
import base64
import contextlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid

import pytest

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    CommandResult,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    SandboxException,
    TimeoutException,
)

from conftest import HOME

# Hard upper bound for anything a test waits on (a poll, an event, a thread).
DEADLINE_S = 20

# A shell fragment that keeps a process alive until it is killed; the daemon
# kills every process started through the SDK after the default 60 s timeout.
LONG_SLEEP = "sleep 300"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def wait_until(predicate, what: str, timeout: float = DEADLINE_S):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def proc_state(pid: int):
    """The state letter of ``pid`` from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ..." — comm may contain spaces and parentheses.
    return text[text.rindex(")") + 2]


def proc_argv0(pid: int):
    """``argv[0]`` of a live ``pid`` from ``/proc/<pid>/cmdline``, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def is_dead(pid: int) -> bool:
    """True if ``pid`` no longer runs: gone, or a zombie waiting to be reaped.

    A killed grandchild is re-parented to PID 1 of this machine, which may reap
    it a little later; a zombie is already dead.
    """
    return proc_state(pid) in (None, "Z", "X")


def wait_dead(pid: int, what: str) -> None:
    wait_until(lambda: is_dead(pid), f"{what} (pid {pid}) to die")


def listed_pids(sandbox) -> set:
    return {p.pid for p in sandbox.commands.list()}


def wait_unlisted(sandbox, pid: int) -> None:
    wait_until(lambda: pid not in listed_pids(sandbox), f"pid {pid} to leave commands.list()")


@contextlib.contextmanager
def background(sandbox, cmd: str, **kwargs):
    """``commands.run(cmd, background=True)``; the process is killed on exit."""
    handle = sandbox.commands.run(cmd, background=True, **kwargs)
    try:
        yield handle
    finally:
        with contextlib.suppress(Exception):
            sandbox.commands.kill(handle.pid)


def first_stdout_line(handle) -> str:
    """Iterate a background handle until one full stdout line has arrived."""
    buf = ""
    for stdout, _stderr, _pty in handle:
        if stdout:
            buf += stdout
            if "\n" in buf:
                return buf.split("\n", 1)[0]
    raise AssertionError(f"stream ended before a stdout line; got {buf!r}")


class PtySession:
    """Consumes a sync PTY handle with ``handle.wait(on_pty=...)`` in a thread.

    ``wait_for`` blocks (with a deadline) until a regex matches the output seen
    so far; ``finish`` joins the thread and returns the result or exception.
    """

    def __init__(self, sandbox, handle):
        self.sandbox = sandbox
        self.handle = handle
        self.pid = handle.pid
        self.output = bytearray()
        self.result = None
        self.error = None
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"pty-{self.pid}", daemon=True)
        self._thread.start()

    def _on_pty(self, data: bytes) -> None:
        with self._cond:
            self.output.extend(data)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self.result = self.handle.wait(on_pty=self._on_pty)
        except BaseException as e:  # reported by finish()
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def send(self, data: bytes) -> None:
        self.sandbox.pty.send_stdin(self.pid, data)

    def wait_for(self, pattern: bytes, timeout: float = DEADLINE_S) -> "re.Match":
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = re.search(pattern, bytes(self.output))
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._done:
                    raise AssertionError(
                        f"{pattern!r} not seen in PTY output "
                        f"({'ended' if self._done else 'timed out'}): {bytes(self.output)!r}"
                    )
                self._cond.wait(remaining)

    def finish(self, timeout: float = DEADLINE_S):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), (
            f"PTY {self.pid} did not end within {timeout}s: {bytes(self.output)!r}"
        )
        return self.result, self.error


@contextlib.contextmanager
def pty_session(sandbox, size=PtySize(rows=24, cols=80), **kwargs):
    handle = sandbox.pty.create(size, **kwargs)
    session = PtySession(sandbox, handle)
    try:
        yield session
    finally:
        with contextlib.suppress(Exception):
            sandbox.pty.kill(handle.pid)


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def os_user():
    """A real non-root user with its own primary group and one supplementary group."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    for tool in ("useradd", "userdel", "groupadd", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not available")
    suffix = uuid.uuid4().hex[:8]
    name, extra_group = f"e2eu{suffix}", f"e2eg{suffix}"
    subprocess.run(["groupadd", extra_group], check=True, capture_output=True)
    try:
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--shell", "/bin/bash",
             "--groups", extra_group, name],
            check=True,
            capture_output=True,
        )
        try:
            yield pwd.getpwnam(name)
        finally:
            subprocess.run(["userdel", "--force", "--remove", name], capture_output=True)
    finally:
        subprocess.run(["groupdel", extra_group], capture_output=True)


# --------------------------------------------------------------------------
# foreground run: output, exit codes, errors
# --------------------------------------------------------------------------


def test_run_returns_stdout_stderr_and_exit_code_zero(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2")

    assert isinstance(result, CommandResult)
    assert (result.stdout, result.stderr, result.exit_code, result.error) == (
        "out\n",
        "err\n",
        0,
        None,
    )


def test_run_nonzero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; echo oops >&2; exit 3")

    e = info.value
    assert isinstance(e, SandboxException)
    assert (e.exit_code, e.stdout, e.stderr) == (3, "partial\n", "oops\n")
    assert e.error == "exit status 3"


def test_run_killed_by_own_signal_reports_signal(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo before; kill -TERM $$")

    assert (info.value.exit_code, info.value.stdout) == (-1, "before\n")
    assert info.value.error == "signal: terminated"


def test_run_missing_binary_exits_127_with_not_found(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("definitely-not-a-binary-e2e --help")

    assert info.value.exit_code == 127
    assert "definitely-not-a-binary-e2e" in info.value.stderr
    assert "not found" in info.value.stderr
    assert info.value.stdout == ""


def test_run_missing_cwd_raises_invalid_argument(sandbox, workdir):
    missing = os.path.join(workdir, "no", "such", "dir")

    with pytest.raises(InvalidArgumentException) as info:
        sandbox.commands.run("pwd", cwd=missing)

    assert missing in str(info.value)
    assert not os.path.exists(missing)


def test_run_unknown_user_raises_authentication_error(sandbox):
    with pytest.raises(AuthenticationException) as info:
        sandbox.commands.run("true", user="no-such-user-e2e")

    assert "no-such-user-e2e" in str(info.value)


# --------------------------------------------------------------------------
# environment, cwd, users
# --------------------------------------------------------------------------


def test_run_envs_are_passed_and_override_defaults(sandbox):
    result = sandbox.commands.run(
        'printf "%s|%s|%s" "$E2E_A" "$E2E_B" "$HOME"',
        envs={"E2E_A": "value with spaces", "E2E_B": "ünïcödé=x", "HOME": "/custom-home"},
    )

    assert result.stdout == "value with spaces|ünïcödé=x|/custom-home"


def test_run_initial_environment_is_built_by_the_daemon(sandbox):
    # /proc/$$/environ is what the daemon passed to exec, before any profile
    # script of the login shell ran.
    result = sandbox.commands.run(
        "tr '\\0' '\\n' < /proc/$$/environ", envs={"E2E_ONLY": "1"}
    )

    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert env["HOME"] == HOME
    assert env["USER"] == env["LOGNAME"] == "root"
    assert env["E2E_ONLY"] == "1"
    assert env["PATH"]
    assert env.get("E2B_SANDBOX") == "true"
    # Nothing of the test runner's / daemon's own environment leaks in.
    allowed = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "E2E_ONLY"}
    assert {k for k in env if not k.startswith("E2B_")} <= allowed, env


def test_run_default_cwd_is_home(sandbox):
    assert sandbox.commands.run("pwd").stdout == f"{HOME}\n"


def test_run_absolute_cwd(sandbox, workdir):
    result = sandbox.commands.run("pwd; touch here.txt", cwd=workdir)

    assert result.stdout == f"{workdir}\n"
    assert os.path.isfile(os.path.join(workdir, "here.txt"))


@pytest.mark.parametrize("form", ["relative", "tilde"])
def test_run_cwd_relative_to_home(sandbox, home_name, form):
    os.mkdir(os.path.join(HOME, home_name))
    cwd = home_name if form == "relative" else f"~/{home_name}"

    result = sandbox.commands.run("pwd", cwd=cwd)

    assert result.stdout == f"{os.path.join(HOME, home_name)}\n"


def test_run_as_root_explicitly(sandbox):
    result = sandbox.commands.run("whoami; id -u; id -G; echo $HOME", user="root")

    name, uid, groups, home = result.stdout.splitlines()
    assert (name, uid, home) == ("root", "0", HOME)
    assert {int(g) for g in groups.split()} == set(os.getgrouplist("root", 0))


def test_run_as_other_user_identity(sandbox, os_user):
    result = sandbox.commands.run(
        "whoami; id -u; id -g; id -G; echo $HOME; echo $USER; pwd", user=os_user.pw_name
    )

    name, uid, gid, groups, home, env_user, cwd = result.stdout.splitlines()
    assert (name, env_user) == (os_user.pw_name, os_user.pw_name)
    assert (int(uid), int(gid)) == (os_user.pw_uid, os_user.pw_gid)
    group_ids = [int(g) for g in groups.split()]
    assert group_ids[0] == os_user.pw_gid
    assert set(group_ids) == set(os.getgrouplist(os_user.pw_name, os_user.pw_gid))
    assert len(group_ids) == 2  # primary + the supplementary group
    assert home == cwd == os_user.pw_dir


def test_run_as_other_user_creates_files_it_owns(sandbox, os_user):
    target = os.path.join(os_user.pw_dir, "made-by-command.txt")

    sandbox.commands.run("echo data > ~/made-by-command.txt; mkdir -p ~/made-dir", user=os_user.pw_name)

    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (os_user.pw_uid, os_user.pw_gid)
    dst = os.stat(os.path.join(os_user.pw_dir, "made-dir"))
    assert stat.S_ISDIR(dst.st_mode)
    assert (dst.st_uid, dst.st_gid) == (os_user.pw_uid, os_user.pw_gid)
    with open(target) as f:
        assert f.read() == "data\n"


def test_run_as_other_user_is_unprivileged(sandbox, os_user, workdir):
    # workdir is root's 0700 mkdtemp directory: the user really is unprivileged.
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run(f"touch {workdir}/nope", user=os_user.pw_name)

    assert "Permission denied" in info.value.stderr
    assert os.listdir(workdir) == []


# --------------------------------------------------------------------------
# stdin
# --------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [False, None], ids=["stdin-false", "stdin-default"])
def test_run_without_stdin_reads_eof_immediately(sandbox, stdin):
    kwargs = {} if stdin is None else {"stdin": stdin}

    result = sandbox.commands.run(
        "readlink /proc/self/fd/0; cat; echo rc=$?", timeout=DEADLINE_S, **kwargs
    )

    assert result.stdout == "/dev/null\nrc=0\n"


def test_run_with_stdin_gets_a_pipe(sandbox):
    with background(sandbox, "readlink /proc/self/fd/0", stdin=True) as handle:
        result = handle.wait()

    assert re.fullmatch(r"pipe:\[\d+\]\n", result.stdout), result.stdout


def test_send_stdin_and_close_stdin(sandbox):
    payload = [b"hello ", "wörld\n", bytes(range(256))]
    with background(sandbox, "wc -c", stdin=True) as handle:
        for chunk in payload:
            sandbox.commands.send_stdin(handle.pid, chunk)
        sandbox.commands.close_stdin(handle.pid)
        result = handle.wait()

    expected = sum(len(c.encode() if isinstance(c, str) else c) for c in payload)
    assert result.stdout.strip() == str(expected)


def test_send_stdin_is_echoed_back_in_order(sandbox):
    lines = [f"line {i}\n" for i in range(50)]
    with background(sandbox, "cat", stdin=True) as handle:
        for line in lines:
            handle.send_stdin(line)
        handle.close_stdin()
        result = handle.wait()

    assert result.stdout == "".join(lines)


def test_close_stdin_is_idempotent_and_blocks_further_input(sandbox):
    with background(sandbox, "cat", stdin=True) as handle:
        sandbox.commands.send_stdin(handle.pid, "before\n")
        sandbox.commands.close_stdin(handle.pid)
        sandbox.commands.close_stdin(handle.pid)
        result = handle.wait()
        with pytest.raises(SandboxException):
            sandbox.commands.send_stdin(handle.pid, "after\n")

    assert result.stdout == "before\n"


def test_send_stdin_without_stdin_fails(sandbox):
    with background(sandbox, "cat") as handle:
        with pytest.raises(SandboxException) as info:
            sandbox.commands.send_stdin(handle.pid, "ignored\n")
        assert "stdin" in str(info.value)
        result = handle.wait()

    assert result.stdout == ""


def test_stream_input_sends_chunks_in_order(sandbox):
    chunks = ["alpha\n", b"beta\n", "gamma ", bytes(range(256)), "ünï\n"]
    with background(sandbox, "od -An -v -tx1", stdin=True) as handle:
        sandbox.commands.stream_input(handle.pid, iter(chunks))
        sandbox.commands.close_stdin(handle.pid)
        dump = handle.wait().stdout

    expected = b"".join(c.encode() if isinstance(c, str) else c for c in chunks)
    assert bytes.fromhex("".join(dump.split())) == expected


def test_stream_input_rejects_a_single_string(sandbox):
    with background(sandbox, "cat", stdin=True) as handle:
        with pytest.raises(InvalidArgumentException):
            sandbox.commands.stream_input(handle.pid, "not an iterable of chunks")


def test_stdin_calls_on_unknown_pid_raise_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(2**31 - 2, "x")
    with pytest.raises(NotFoundException):
        sandbox.commands.close_stdin(2**31 - 2)
    with pytest.raises(NotFoundException):
        sandbox.commands.stream_input(2**31 - 2, ["x"])


# --------------------------------------------------------------------------
# callbacks and large output
# --------------------------------------------------------------------------


def test_run_callbacks_receive_all_output(sandbox):
    out_chunks, err_chunks = [], []

    result = sandbox.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done",
        on_stdout=out_chunks.append,
        on_stderr=err_chunks.append,
    )

    assert "".join(out_chunks) == result.stdout == "out1\nout2\nout3\n"
    assert "".join(err_chunks) == result.stderr == "err1\nerr2\nerr3\n"


def test_run_large_binary_output_complete_and_in_order(sandbox, workdir):
    blob = os.path.join(workdir, "blob.bin")
    chunks = []

    result = sandbox.commands.run(
        f"head -c 5242880 /dev/urandom > {blob} && base64 {blob}",
        on_stdout=chunks.append,
    )

    with open(blob, "rb") as f:
        data = f.read()
    assert len(data) == 5 * 1024 * 1024
    expected = base64.encodebytes(data).decode()  # 76-column lines, like base64(1)
    assert len(result.stdout) == len(expected)
    assert result.stdout == expected
    assert "".join(chunks) == expected
    assert len(chunks) > 1


def test_run_large_stdout_and_stderr_together(sandbox):
    n = 300_000
    expected = "".join(f"{i}\n" for i in range(1, n + 1))

    result = sandbox.commands.run(f"seq 1 {n} >&2 & seq 1 {n}; wait")

    assert result.stdout == expected
    assert result.stderr == expected


def test_run_without_retained_output(sandbox):
    chunks = []

    result = sandbox.commands.run("seq 1 1000", on_stdout=chunks.append, retain_output=False)

    assert (result.stdout, result.stderr, result.exit_code) == (None, None, 0)
    assert "".join(chunks) == "".join(f"{i}\n" for i in range(1, 1001))


def test_concurrent_runs_keep_their_own_output(sandbox):
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            results[i] = sandbox.commands.run(f"seq {i} {i + 2000}; echo done-{i} >&2")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)

    assert not errors, errors
    assert sorted(results) == list(range(8))
    for i, r in results.items():
        assert r.stdout == "".join(f"{k}\n" for k in range(i, i + 2001))
        # Login shells starting at the same moment can make this machine's
        # ~/.bashrc (pyenv rehash) complain on stderr; the command's own line
        # must still be there, last.
        assert r.stderr.endswith(f"done-{i}\n"), r.stderr


# --------------------------------------------------------------------------
# background, list, connect, kill
# --------------------------------------------------------------------------


def test_background_returns_handle_with_pid_and_list_shows_it(sandbox, workdir):
    cmd = f"echo started; {LONG_SLEEP}"
    with background(sandbox, cmd, envs={"E2E_LIST": "yes"}, cwd=workdir) as handle:
        assert isinstance(handle.pid, int) and handle.pid > 0
        assert first_stdout_line(handle) == "started"
        assert proc_state(handle.pid) not in (None, "Z")

        infos = [p for p in sandbox.commands.list() if p.pid == handle.pid]

        assert len(infos) == 1
        info = infos[0]
        assert info.cmd == "/bin/bash"
        assert info.args == ["-l", "-c", cmd]
        assert info.envs == {"E2E_LIST": "yes"}
        assert info.cwd == workdir
        assert info.tag is None


def test_list_omits_finished_processes(sandbox):
    handle = sandbox.commands.run("echo bye", background=True)
    assert handle.wait().stdout == "bye\n"

    wait_unlisted(sandbox, handle.pid)


def test_connect_receives_later_output_and_exit_code(sandbox):
    with background(
        sandbox, "read line; echo got:$line; echo err:$line >&2; exit 4", stdin=True
    ) as handle:
        connected = sandbox.commands.connect(handle.pid)
        assert connected.pid == handle.pid
        # The output is produced only after connect() returned (it waits for the
        # line we send now), so the connected stream must see all of it.
        sandbox.commands.send_stdin(handle.pid, "ping\n")

        with pytest.raises(CommandExitException) as via_connect:
            connected.wait()
        with pytest.raises(CommandExitException) as via_start:
            handle.wait()

    for e in (via_connect.value, via_start.value):
        assert (e.exit_code, e.stdout, e.stderr, e.error) == (
            4,
            "got:ping\n",
            "err:ping\n",
            "exit status 4",
        )


def test_disconnect_leaves_process_running_and_connect_reattaches(sandbox):
    with background(sandbox, "read line; echo got:$line", stdin=True) as handle:
        handle.disconnect()
        assert handle.pid in listed_pids(sandbox)

        connected = sandbox.commands.connect(handle.pid)
        connected.send_stdin("again\n")
        result = connected.wait()

    assert (result.stdout, result.exit_code) == ("got:again\n", 0)


def test_connect_after_exit_reports_retained_exit(sandbox):
    handle = sandbox.commands.run("exit 6", background=True)
    with pytest.raises(CommandExitException):
        handle.wait()

    with pytest.raises(CommandExitException) as info:
        sandbox.commands.connect(handle.pid).wait()

    assert (info.value.exit_code, info.value.error) == (6, "exit status 6")


def test_connect_unknown_pid_raises_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(2**31 - 2)


def test_kill_background_command(sandbox):
    with background(sandbox, f"echo up; {LONG_SLEEP}") as handle:
        assert first_stdout_line(handle) == "up"

        assert sandbox.commands.kill(handle.pid) is True

        with pytest.raises(CommandExitException) as info:
            handle.wait()
        assert (info.value.exit_code, info.value.error) == (-1, "signal: killed")
        assert info.value.stdout == "up\n"
        wait_dead(handle.pid, "killed command")
        wait_unlisted(sandbox, handle.pid)
        assert sandbox.commands.kill(handle.pid) is False


def test_handle_kill(sandbox):
    with background(sandbox, LONG_SLEEP) as handle:
        assert handle.kill() is True

        with pytest.raises(CommandExitException) as info:
            handle.wait()

    assert info.value.exit_code == -1
    wait_dead(handle.pid, "killed command")


def test_kill_unknown_pid_returns_false(sandbox):
    assert sandbox.commands.kill(2**31 - 2) is False


def test_kill_takes_children_with_it(sandbox):
    with background(sandbox, "bash -c 'sleep 1000 & echo $!; wait'") as handle:
        grandchild = int(first_stdout_line(handle))
        # The forked child may not have exec'd sleep yet when its pid is printed.
        wait_until(lambda: proc_argv0(grandchild) == b"sleep", f"pid {grandchild} to run sleep")

        assert sandbox.commands.kill(handle.pid) is True
        with pytest.raises(CommandExitException) as info:
            handle.wait()

    assert info.value.exit_code == -1
    wait_dead(handle.pid, "killed command")
    wait_dead(grandchild, "child of the killed command")


# --------------------------------------------------------------------------
# timeout
# --------------------------------------------------------------------------


def test_run_timeout_kills_command(sandbox):
    pids = []

    with pytest.raises(TimeoutException):
        sandbox.commands.run(
            f"sleep 1000 & echo $$ $!; {LONG_SLEEP}",
            timeout=3,
            on_stdout=lambda s: pids.extend(int(p) for p in s.split()),
        )

    assert len(pids) == 2, pids
    shell, child = pids
    wait_dead(shell, "timed-out command")
    wait_dead(child, "child of the timed-out command")
    wait_unlisted(sandbox, shell)


def test_run_within_timeout_succeeds(sandbox):
    result = sandbox.commands.run("echo quick", timeout=DEADLINE_S)

    assert result.stdout == "quick\n"


# --------------------------------------------------------------------------
# PTY
# --------------------------------------------------------------------------


def test_pty_is_a_terminal_with_requested_size(sandbox):
    with pty_session(sandbox, PtySize(rows=24, cols=80)) as s:
        assert isinstance(s.pid, int) and s.pid > 0
        s.send(b"tty; stty size; exit\n")
        result, error = s.finish()

    assert error is None, error
    assert result.exit_code == 0
    # The PTY handle delivers terminal bytes only through on_pty.
    assert (result.stdout, result.stderr) == ("", "")
    out = bytes(s.output)
    assert re.search(rb"/dev/pts/\d+\r\n24 80\r\n", out), out


def test_pty_exit_code_is_reported(sandbox):
    with pty_session(sandbox) as s:
        s.send(b"exit 5\n")
        _result, error = s.finish()

    assert isinstance(error, CommandExitException), error
    assert (error.exit_code, error.error) == (5, "exit status 5")


def test_pty_resize_is_seen_by_stty(sandbox):
    with pty_session(sandbox, PtySize(rows=24, cols=80)) as s:
        s.send(b"stty size; echo M$((40+2))\n")
        s.wait_for(rb"24 80\r\nM42")

        sandbox.pty.resize(s.pid, PtySize(rows=50, cols=132))
        s.send(b"stty size; echo N$((40+3))\n")
        s.wait_for(rb"50 132\r\nN43")

        s.send(b"exit\n")
        result, error = s.finish()

    assert error is None and result.exit_code == 0, error


def test_pty_environment_cwd_and_user(sandbox, workdir, os_user):
    os.chmod(workdir, 0o755)
    with pty_session(sandbox, cwd=workdir, envs={"E2E_PTY": "on"}, user=os_user.pw_name) as s:
        s.send(b'echo "[$(whoami)|$(pwd)|$E2E_PTY|$TERM|$HOME]"; exit\n')
        result, error = s.finish()

    assert error is None, error
    expected = f"[{os_user.pw_name}|{workdir}|on|xterm-256color|{os_user.pw_dir}]".encode()
    assert expected in bytes(s.output), bytes(s.output)


def test_pty_kill(sandbox):
    with pty_session(sandbox) as s:
        s.send(b"echo M$((40+2))\n")
        s.wait_for(rb"M42")

        assert sandbox.pty.kill(s.pid) is True
        _result, error = s.finish()

        assert isinstance(error, CommandExitException), error
        assert (error.exit_code, error.error) == (-1, "signal: killed")
        wait_dead(s.pid, "killed PTY")
        wait_unlisted(sandbox, s.pid)
        assert sandbox.pty.kill(s.pid) is False


def test_pty_connect_after_disconnect(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    try:
        handle.disconnect()
        assert handle.pid in listed_pids(sandbox)

        s = PtySession(sandbox, sandbox.pty.connect(handle.pid))
        assert s.pid == handle.pid
        s.send(b"echo M$((40+2)); exit 7\n")
        s.wait_for(rb"M42")
        _result, error = s.finish()
    finally:
        with contextlib.suppress(Exception):
            sandbox.pty.kill(handle.pid)

    assert isinstance(error, CommandExitException), error
    assert error.exit_code == 7


def test_pty_stream_input(sandbox):
    with pty_session(sandbox) as s:
        sandbox.pty.stream_input(s.pid, [b"echo A$((1+1))", "B$((2+2))\n", b"exit\n"])
        result, error = s.finish()

    assert error is None, error
    assert b"A2B4\r\n" in bytes(s.output)


def test_pty_rejects_stdin_pipe_calls(sandbox):
    with pty_session(sandbox) as s:
        with pytest.raises(SandboxException):
            sandbox.commands.send_stdin(s.pid, "x")
        with pytest.raises(SandboxException):
            sandbox.commands.close_stdin(s.pid)
        # The terminal still works afterwards.
        s.send(b"echo M$((40+2)); exit\n")
        s.wait_for(rb"M42")
        result, error = s.finish()

    assert error is None, error


def test_pty_calls_on_a_pipe_process_fail(sandbox):
    with background(sandbox, "cat", stdin=True) as handle:
        with pytest.raises(SandboxException):
            sandbox.pty.resize(handle.pid, PtySize(rows=10, cols=10))
        with pytest.raises(SandboxException):
            sandbox.pty.send_stdin(handle.pid, b"x")
        sandbox.commands.send_stdin(handle.pid, "still ok\n")
        sandbox.commands.close_stdin(handle.pid)
        assert handle.wait().stdout == "still ok\n"


def test_pty_calls_on_unknown_pid_raise_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.pty.resize(2**31 - 2, PtySize(rows=10, cols=10))
    with pytest.raises(NotFoundException):
        sandbox.pty.send_stdin(2**31 - 2, b"x")
    with pytest.raises(NotFoundException):
        sandbox.pty.connect(2**31 - 2)


# --------------------------------------------------------------------------
# async client
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_run_foreground(envd_url):
    sbx = await AsyncSandbox.create()
    out_chunks = []

    result = await sbx.commands.run(
        "echo out; echo err >&2", on_stdout=out_chunks.append, envs={"X": "1"}
    )

    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
    assert "".join(out_chunks) == "out\n"

    with pytest.raises(CommandExitException) as info:
        await sbx.commands.run("echo $X; exit 9", envs={"X": "x9"})
    assert (info.value.exit_code, info.value.stdout) == (9, "x9\n")


@pytest.mark.asyncio
async def test_async_background_list_connect(envd_url):
    sbx = await AsyncSandbox.create()
    handle = await sbx.commands.run("read line; echo got:$line; exit 2", background=True, stdin=True)
    try:
        assert handle.pid in {p.pid for p in await sbx.commands.list()}
        seen = []
        connected = await sbx.commands.connect(handle.pid, on_stdout=seen.append)
        await sbx.commands.send_stdin(handle.pid, "async\n")

        with pytest.raises(CommandExitException) as info:
            await asyncio.wait_for(connected.wait(), DEADLINE_S)
        assert (info.value.exit_code, info.value.stdout) == (2, "got:async\n")
        assert "".join(seen) == "got:async\n"
        assert connected.exit_code == 2

        with pytest.raises(CommandExitException):
            await asyncio.wait_for(handle.wait(), DEADLINE_S)
        assert handle.stdout == "got:async\n"
    finally:
        await sbx.commands.kill(handle.pid)


@pytest.mark.asyncio
async def test_async_kill(envd_url):
    sbx = await AsyncSandbox.create()
    handle = await sbx.commands.run(LONG_SLEEP, background=True)

    assert await sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        await asyncio.wait_for(handle.wait(), DEADLINE_S)

    assert (info.value.exit_code, info.value.error) == (-1, "signal: killed")
    assert await sbx.commands.kill(2**31 - 2) is False


@pytest.mark.asyncio
async def test_async_stream_input_handle(envd_url):
    sbx = await AsyncSandbox.create()
    handle = await sbx.commands.run("cat", background=True, stdin=True)
    try:
        async with sbx.commands.stream_input(handle.pid) as stdin:
            for i in range(20):
                await stdin.send(f"chunk {i}\n")
        await sbx.commands.close_stdin(handle.pid)
        result = await asyncio.wait_for(handle.wait(), DEADLINE_S)
    finally:
        await sbx.commands.kill(handle.pid)

    assert result.stdout == "".join(f"chunk {i}\n" for i in range(20))


@pytest.mark.asyncio
async def test_async_pty(envd_url):
    sbx = await AsyncSandbox.create()
    output = bytearray()
    ready = asyncio.Event()

    def on_data(data: bytes) -> None:
        output.extend(data)
        if b"M42" in output:
            ready.set()

    handle = await sbx.pty.create(PtySize(rows=30, cols=100), on_data=on_data)
    try:
        await sbx.pty.send_stdin(handle.pid, b"tty; stty size; echo M$((40+2))\n")
        await asyncio.wait_for(ready.wait(), DEADLINE_S)
        await sbx.pty.resize(handle.pid, PtySize(rows=40, cols=120))
        await sbx.pty.send_stdin(handle.pid, b"stty size; exit 3\n")

        with pytest.raises(CommandExitException) as info:
            await asyncio.wait_for(handle.wait(), DEADLINE_S)
    finally:
        await sbx.pty.kill(handle.pid)

    assert info.value.exit_code == 3
    assert re.search(rb"/dev/pts/\d+\r\n30 100\r\nM42", output), bytes(output)
    assert b"40 120\r\n" in output


@pytest.mark.asyncio
async def test_async_pty_connect_and_kill(envd_url):
    sbx = await AsyncSandbox.create()
    handle = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=lambda _: None)
    try:
        await handle.disconnect()
        output = bytearray()
        seen = asyncio.Event()

        def on_data(data: bytes) -> None:
            output.extend(data)
            if b"M42" in output:
                seen.set()

        connected = await sbx.pty.connect(handle.pid, on_data=on_data)
        await sbx.pty.send_stdin(handle.pid, b"echo M$((40+2))\n")
        await asyncio.wait_for(seen.wait(), DEADLINE_S)

        assert await connected.kill() is True
        with pytest.raises(CommandExitException) as info:
            await asyncio.wait_for(connected.wait(), DEADLINE_S)
        assert info.value.exit_code == -1
    finally:
        await sbx.pty.kill(handle.pid)
