"""Directory watching in envd as seen through the official E2B Python SDK.

The sync client's ``files.watch_dir`` uses the polling RPCs (CreateWatcher /
GetWatcherEvents / RemoveWatcher); the async client's ``files.watch_dir``
uses the WatchDir server stream. In every test the SDK itself makes the
changes (``files.write``, ``write_files``, ``make_dir``, ``rename``,
``remove``) and the watcher has to report them as the README's "Watching
directories" section describes.

No fixed sleeps: a sync watcher is polled until what is expected arrived or
a hard deadline passes; an async watcher's ``on_event`` / ``on_exit`` wake an
``asyncio.Event`` that is awaited with a timeout.

To assert exactly which events an operation produced, a test ends with a
*sentinel*: one more upload into the watched directory, whose events come
after every earlier event (one inotify queue, delivered in order). Once the
sentinel's WRITE has arrived, everything the earlier operations caused has
arrived too.
"""

import asyncio
import os
import re
import time
import uuid

import pytest

from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)

DEADLINE_S = 20
POLL_INTERVAL_S = 0.05

CREATE = FilesystemEventType.CREATE
WRITE = FilesystemEventType.WRITE
REMOVE = FilesystemEventType.REMOVE
RENAME = FilesystemEventType.RENAME
CHMOD = FilesystemEventType.CHMOD

UPLOAD_TEMP_MARKER = "envd-upload"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def pairs(events):
    """Events as ``(type, name)`` tuples, in order."""
    return [(e.type, e.name) for e in events]


def of(events, name):
    """The types of the events about ``name``, in order."""
    return [e.type for e in events if e.name == name]


def without_chmod_of(events, *dirs):
    """``events`` without CHMOD events of ``dirs``.

    Directories the daemon creates (MakeDir, or an upload's missing parents)
    are chowned to the request's user, as envd does; inotify reports that as
    an attribute change, so a CHMOD of each new directory may follow its
    CREATE (twice under a recursive watch: once from the parent's watch and
    once from the directory's own). Tests about other events ignore those.
    """
    return [e for e in events if not (e.type == CHMOD and e.name in dirs)]


def new_sentinel_name() -> str:
    return f"zz-sentinel-{uuid.uuid4().hex[:8]}"


def sentinel_seen(name):
    return lambda events: WRITE in of(events, name)


def assert_no_upload_temp_names(events):
    """Neither temp files nor unnamed files (the kernel calls them ``#<inode>``)."""
    leaked = [
        e.name
        for e in events
        if UPLOAD_TEMP_MARKER in e.name
        or re.fullmatch(r"#[0-9]+", os.path.basename(e.name))
    ]
    assert leaked == [], f"upload temp files leaked into watch events: {leaked}"


def upload_temp_files(directory):
    """Names in ``directory`` (on disk) that are in-progress upload temp files."""
    return [n for n in os.listdir(directory) if UPLOAD_TEMP_MARKER in n]


def unnamed_upload_files(directory):
    """Uploads of new files in progress in ``directory``: the daemon writes those as
    unnamed (``O_TMPFILE``) files, which show only among its open descriptors."""
    prefix = os.path.join(directory, "#")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix) and target.endswith(" (deleted)"):
                found.append(target)
    return found


def upload_in_progress(directory):
    """Whether an upload is being written in ``directory`` (a temp file or an unnamed one)."""
    return bool(upload_temp_files(directory) or unnamed_upload_files(directory))


def wait_until(condition, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


async def async_wait_until(condition, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


class Poller:
    """Collects a sync (polling) watcher's events."""

    def __init__(self, handle):
        self.handle = handle
        self.events = []

    def wait_for(self, predicate, what):
        """Poll until ``predicate(all events so far)`` holds; return all events."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            self.events.extend(self.handle.get_new_events())
            if predicate(self.events):
                return self.events
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"timed out after {DEADLINE_S}s waiting for {what}; "
                    f"events so far: {pairs(self.events)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def settle(self, sandbox, watched_dir):
        """Upload a sentinel into ``watched_dir``, wait for its WRITE, and return
        every event that came before it (the sentinel's own events excluded)."""
        name = new_sentinel_name()
        sandbox.files.write(os.path.join(watched_dir, name), "")
        self.wait_for(sentinel_seen(name), f"the sentinel {name}")
        assert of(self.events, name) == [CREATE, WRITE], pairs(self.events)
        return [e for e in self.events if e.name != name]


class Collector:
    """Collects an async (streaming) watcher's events and its exit."""

    def __init__(self):
        self.events = []
        self.exits = []
        self._changed = asyncio.Event()

    def on_event(self, event):
        self.events.append(event)
        self._changed.set()

    def on_exit(self, error):
        self.exits.append(error)
        self._changed.set()

    async def wait_for(self, predicate, what):
        async def loop():
            while True:
                self._changed.clear()
                if predicate(self):
                    return
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), DEADLINE_S)
        except asyncio.TimeoutError:
            pytest.fail(
                f"timed out after {DEADLINE_S}s waiting for {what}; "
                f"events so far: {pairs(self.events)}; exits: {self.exits!r}"
            )

    async def wait_events(self, predicate, what):
        await self.wait_for(lambda c: predicate(c.events), what)
        return self.events

    async def wait_exit(self):
        await self.wait_for(lambda c: bool(c.exits), "on_exit")
        return self.exits[0]

    async def settle(self, sbx, watched_dir):
        name = new_sentinel_name()
        await sbx.files.write(os.path.join(watched_dir, name), "")
        await self.wait_events(sentinel_seen(name), f"the sentinel {name}")
        assert of(self.events, name) == [CREATE, WRITE], pairs(self.events)
        return [e for e in self.events if e.name != name]


def watch(sandbox, path, **kwargs):
    return Poller(sandbox.files.watch_dir(path, **kwargs))


async def awatch(sbx, path, **kwargs):
    collector = Collector()
    handle = await sbx.files.watch_dir(
        path, on_event=collector.on_event, on_exit=collector.on_exit, **kwargs
    )
    return handle, collector


@pytest.fixture
def watched(workdir):
    """A directory to watch inside ``workdir`` (so the watched dir itself can be
    removed by a test while ``workdir`` is still cleaned up)."""
    path = os.path.join(workdir, "watched")
    os.mkdir(path)
    return path


def check_file_entry(entry, path, size, metadata):
    assert entry is not None
    assert entry.name == os.path.basename(path)
    assert entry.path == path
    assert entry.type == FileType.FILE
    assert entry.size == size
    assert entry.metadata == metadata


# --------------------------------------------------------------------------
# sync client: polling watcher
# --------------------------------------------------------------------------


def test_write_is_reported_as_create_then_write(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write(os.path.join(watched, "new.txt"), "hello")

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(CREATE, "new.txt"), (WRITE, "new.txt")]
    finally:
        poller.handle.stop()


def test_overwrite_is_reported_as_create_then_write(sandbox, watched):
    path = os.path.join(watched, "existing.txt")
    sandbox.files.write(path, "old")
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write(path, "new content")

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(CREATE, "existing.txt"), (WRITE, "existing.txt")]
        with open(path) as f:
            assert f.read() == "new content"
    finally:
        poller.handle.stop()


def test_write_files_reports_every_file(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write_files(
            [
                {"path": os.path.join(watched, "one.txt"), "data": "1"},
                {"path": os.path.join(watched, "two.bin"), "data": b"\x00\x01"},
            ]
        )

        events = poller.settle(sandbox, watched)

        assert of(events, "one.txt") == [CREATE, WRITE]
        assert of(events, "two.bin") == [CREATE, WRITE]
        assert sorted({e.name for e in events}) == ["one.txt", "two.bin"]
    finally:
        poller.handle.stop()


def test_rename_is_reported_as_rename_of_old_then_create_of_new(sandbox, watched):
    sandbox.files.write(os.path.join(watched, "old.txt"), "x")
    poller = watch(sandbox, watched)
    try:
        sandbox.files.rename(os.path.join(watched, "old.txt"), os.path.join(watched, "new.txt"))

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(RENAME, "old.txt"), (CREATE, "new.txt")]
    finally:
        poller.handle.stop()


def test_remove_is_reported_as_remove(sandbox, watched):
    sandbox.files.write(os.path.join(watched, "doomed.txt"), "x")
    poller = watch(sandbox, watched)
    try:
        sandbox.files.remove(os.path.join(watched, "doomed.txt"))

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(REMOVE, "doomed.txt")]
    finally:
        poller.handle.stop()


def test_make_dir_is_reported_as_create(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        assert sandbox.files.make_dir(os.path.join(watched, "subdir")) is True

        events = poller.settle(sandbox, watched)

        assert pairs(without_chmod_of(events, "subdir")) == [(CREATE, "subdir")]
    finally:
        poller.handle.stop()


def test_recursive_watch_reports_file_in_new_nested_directories(sandbox, watched):
    poller = watch(sandbox, watched, recursive=True)
    try:
        sandbox.files.write(os.path.join(watched, "a/b/c/f.txt"), "deep")

        events = poller.settle(sandbox, watched)

        creates = [e.name for e in events if e.type == CREATE]
        # Each entry is reported once, relative to the watched directory, even
        # though it may have been created before its parent's watch existed.
        assert sorted(creates) == ["a", "a/b", "a/b/c", "a/b/c/f.txt"]
        assert creates.index("a") < creates.index("a/b") < creates.index("a/b/c")
        # The file may also be reported written (if its directory was watched in
        # time); nothing else is reported.
        others = [p for p in pairs(without_chmod_of(events, "a", "a/b", "a/b/c")) if p[0] != CREATE]
        assert others in ([], [(WRITE, "a/b/c/f.txt")]), pairs(events)
    finally:
        poller.handle.stop()


def test_recursive_watch_reports_changes_in_existing_subdirectories(sandbox, watched):
    sub = os.path.join(watched, "sub")
    sandbox.files.make_dir(sub)
    sandbox.files.write(os.path.join(sub, "gone.txt"), "x")
    poller = watch(sandbox, watched, recursive=True)
    try:
        sandbox.files.write(os.path.join(sub, "f.txt"), "x")
        sandbox.files.rename(os.path.join(sub, "f.txt"), os.path.join(sub, "g.txt"))
        sandbox.files.remove(os.path.join(sub, "gone.txt"))

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [
            (CREATE, "sub/f.txt"),
            (WRITE, "sub/f.txt"),
            (RENAME, "sub/f.txt"),
            (CREATE, "sub/g.txt"),
            (REMOVE, "sub/gone.txt"),
        ]
    finally:
        poller.handle.stop()


def test_non_recursive_watch_ignores_changes_inside_subdirectories(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write(os.path.join(watched, "a/inner.txt"), "x")
        sandbox.files.write(os.path.join(watched, "a/inner2.txt"), "y")

        events = poller.settle(sandbox, watched)

        assert pairs(without_chmod_of(events, "a")) == [(CREATE, "a")]
    finally:
        poller.handle.stop()


def test_relative_watch_path_resolves_in_home(sandbox, home_name):
    sandbox.files.make_dir(home_name)
    poller = watch(sandbox, home_name)
    try:
        sandbox.files.write(f"{home_name}/rel.txt", "x")

        events = poller.settle(sandbox, home_name)

        assert pairs(events) == [(CREATE, "rel.txt"), (WRITE, "rel.txt")]
        assert os.path.isfile(os.path.join("/root", home_name, "rel.txt"))
    finally:
        poller.handle.stop()


def test_include_entry_attaches_entry_with_metadata(sandbox, watched):
    path = os.path.join(watched, "meta.txt")
    metadata = {"author": "watcher", "purpose": "e2e"}
    poller = watch(sandbox, watched, include_entry=True)
    try:
        info = sandbox.files.write(path, "twelve bytes", metadata=metadata)
        assert info.metadata == metadata

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(CREATE, "meta.txt"), (WRITE, "meta.txt")]
        for event in events:
            check_file_entry(event.entry, path, 12, metadata)
    finally:
        poller.handle.stop()


def test_include_entry_describes_new_directory(sandbox, watched):
    poller = watch(sandbox, watched, include_entry=True)
    try:
        sandbox.files.make_dir(os.path.join(watched, "d"))

        events = poller.settle(sandbox, watched)

        assert pairs(without_chmod_of(events, "d")) == [(CREATE, "d")]
        # CREATE, and any CHMOD from the chown, describe the new directory.
        for event in events:
            entry = event.entry
            assert entry is not None, pairs(events)
            assert (entry.name, entry.path, entry.type) == ("d", os.path.join(watched, "d"), FileType.DIR)
    finally:
        poller.handle.stop()


def test_include_entry_remove_and_rename_carry_no_entry(sandbox, watched):
    sandbox.files.write(os.path.join(watched, "a.txt"), "x", metadata={"k": "v"})
    sandbox.files.write(os.path.join(watched, "b.txt"), "y", metadata={"k": "w"})
    poller = watch(sandbox, watched, include_entry=True)
    try:
        sandbox.files.rename(os.path.join(watched, "a.txt"), os.path.join(watched, "c.txt"))
        sandbox.files.remove(os.path.join(watched, "b.txt"))

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(RENAME, "a.txt"), (CREATE, "c.txt"), (REMOVE, "b.txt")]
        rename, create, remove = events
        assert rename.entry is None
        assert remove.entry is None
        check_file_entry(create.entry, os.path.join(watched, "c.txt"), 1, {"k": "v"})
    finally:
        poller.handle.stop()


def test_without_include_entry_events_carry_no_entry(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write(os.path.join(watched, "plain.txt"), "x", metadata={"k": "v"})

        events = poller.settle(sandbox, watched)

        assert pairs(events) == [(CREATE, "plain.txt"), (WRITE, "plain.txt")]
        assert [e.entry for e in events] == [None, None]
    finally:
        poller.handle.stop()


def test_events_are_delivered_once(sandbox, watched):
    poller = watch(sandbox, watched)
    try:
        sandbox.files.write(os.path.join(watched, "once.txt"), "x")
        poller.settle(sandbox, watched)

        assert poller.handle.get_new_events() == []
    finally:
        poller.handle.stop()


def test_two_watchers_on_one_directory_each_see_every_event(sandbox, watched):
    first = watch(sandbox, watched)
    second = watch(sandbox, watched)
    try:
        sandbox.files.write(os.path.join(watched, "shared.txt"), "x")

        first_events = first.settle(sandbox, watched)
        second_events = second.wait_for(
            lambda evs: any(e.name.startswith("zz-sentinel-") and e.type == WRITE for e in evs),
            "the sentinel on the second watcher",
        )

        assert pairs(first_events) == [(CREATE, "shared.txt"), (WRITE, "shared.txt")]
        assert pairs(second_events) == pairs(first.events)
    finally:
        first.handle.stop()
        second.handle.stop()


def test_stop_ends_polling(sandbox, watched):
    handle = sandbox.files.watch_dir(watched)
    handle.stop()

    with pytest.raises(SandboxException, match="already stopped"):
        handle.get_new_events()
    # The daemon forgot the watcher: removing it again is not_found.
    with pytest.raises(NotFoundException, match="not found"):
        handle.stop()


def test_watch_missing_path_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(os.path.join(workdir, "missing"))


def test_watch_a_file_raises_invalid_argument(sandbox, workdir):
    path = os.path.join(workdir, "file.txt")
    sandbox.files.write(path, "x")

    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(path)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(path, recursive=True)


def test_removing_the_watched_directory_ends_the_polling_watcher(sandbox, watched):
    handle = sandbox.files.watch_dir(watched)
    poller = Poller(handle)
    try:
        sandbox.files.remove(watched)

        events = poller.wait_for(lambda evs: (REMOVE, ".") in pairs(evs), "REMOVE of '.'")

        assert pairs(events) == [(REMOVE, ".")]
        # The watch has ended: a later poll reports it (once the end has been
        # noticed), and so does every poll after that.
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                late = handle.get_new_events()
            except NotFoundException:
                break
            assert late == [], pairs(late)
            assert time.monotonic() < deadline, "the ended watcher kept answering polls"
            time.sleep(POLL_INTERVAL_S)
        with pytest.raises(NotFoundException):
            handle.get_new_events()
    finally:
        handle.stop()


def test_upload_in_progress_in_a_directory_moved_into_the_tree_is_not_reported(
    sandbox, workdir, watched
):
    """A recursive watch walks a directory moved into the tree; an upload still
    in progress in it (its unnamed file open) must not be reported, and the
    upload, once done, is reported as CREATE and WRITE of its target."""
    inner = os.path.join(watched, "inner")
    parked = os.path.join(workdir, "parked")
    sandbox.files.make_dir(inner)
    poller = watch(sandbox, watched, recursive=True)
    try:

        def body():
            yield b"first half, "
            wait_until(lambda: upload_in_progress(inner), "the upload's file in inner")
            # Move the directory out of the tree and back in while the upload's
            # file is in it; hold the rest of the body back until the
            # watcher has seen it come back (and walked it).
            sandbox.files.rename(inner, parked)
            sandbox.files.rename(parked, inner)
            poller.wait_for(lambda evs: (CREATE, "inner") in pairs(evs), "CREATE of inner")
            yield b"second half"

        sandbox.files.write(os.path.join(inner, "f.txt"), body())

        events = poller.settle(sandbox, watched)

        assert_no_upload_temp_names(events)
        assert pairs(events) == [
            (RENAME, "inner"),
            (CREATE, "inner"),
            (CREATE, "inner/f.txt"),
            (WRITE, "inner/f.txt"),
        ]
        with open(os.path.join(inner, "f.txt"), "rb") as f:
            assert f.read() == b"first half, second half"
    finally:
        poller.handle.stop()


def test_upload_temp_files_never_show_up(sandbox, watched):
    poller = watch(sandbox, watched, recursive=True, include_entry=True)
    try:
        sandbox.files.write(os.path.join(watched, "multipart.txt"), "m")
        sandbox.files.write(os.path.join(watched, "multipart.txt"), "overwritten")
        sandbox.files.write(os.path.join(watched, "octet.bin"), b"o" * 100_000, use_octet_stream=True)
        sandbox.files.write(os.path.join(watched, "gzip.bin"), b"g" * 100_000, gzip=True)
        sandbox.files.write(os.path.join(watched, "nested/deeper/n.txt"), "n")
        sandbox.files.write_files(
            [
                {"path": os.path.join(watched, "nested/w1.txt"), "data": "1"},
                {"path": os.path.join(watched, "w2.txt"), "data": "2"},
            ]
        )

        events = poller.settle(sandbox, watched)

        assert_no_upload_temp_names(events)
        assert {e.name for e in events} == {
            "multipart.txt",
            "octet.bin",
            "gzip.bin",
            "nested",
            "nested/deeper",
            "nested/deeper/n.txt",
            "nested/w1.txt",
            "w2.txt",
        }
        for event in events:
            if event.entry is not None:
                assert UPLOAD_TEMP_MARKER not in event.entry.path
        leftovers = [
            os.path.join(root, n)
            for root, dirs, files in os.walk(watched)
            for n in dirs + files
            if UPLOAD_TEMP_MARKER in n
        ]
        assert leftovers == []
    finally:
        poller.handle.stop()


# --------------------------------------------------------------------------
# async client: WatchDir stream
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_write_is_reported_as_create_then_write(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched)
    try:
        await sbx.files.write(os.path.join(watched, "new.txt"), "hello")

        events = await collector.settle(sbx, watched)

        assert pairs(events) == [(CREATE, "new.txt"), (WRITE, "new.txt")]
        assert_no_upload_temp_names(collector.events)
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_rename_is_reported_as_rename_then_create(envd_url, watched):
    sbx = await AsyncSandbox.create()
    await sbx.files.write(os.path.join(watched, "old.txt"), "x")
    handle, collector = await awatch(sbx, watched)
    try:
        await sbx.files.rename(os.path.join(watched, "old.txt"), os.path.join(watched, "new.txt"))

        events = await collector.settle(sbx, watched)

        assert pairs(events) == [(RENAME, "old.txt"), (CREATE, "new.txt")]
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_remove_is_reported_as_remove(envd_url, watched):
    sbx = await AsyncSandbox.create()
    await sbx.files.write(os.path.join(watched, "doomed.txt"), "x")
    handle, collector = await awatch(sbx, watched)
    try:
        await sbx.files.remove(os.path.join(watched, "doomed.txt"))

        events = await collector.settle(sbx, watched)

        assert pairs(events) == [(REMOVE, "doomed.txt")]
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_make_dir_is_reported_as_create(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched)
    try:
        assert await sbx.files.make_dir(os.path.join(watched, "subdir")) is True

        events = await collector.settle(sbx, watched)

        assert pairs(without_chmod_of(events, "subdir")) == [(CREATE, "subdir")]
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_recursive_watch_reports_file_in_new_nested_directories(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched, recursive=True)
    try:
        await sbx.files.write(os.path.join(watched, "a/b/c/f.txt"), "deep")

        events = await collector.settle(sbx, watched)

        creates = [e.name for e in events if e.type == CREATE]
        assert sorted(creates) == ["a", "a/b", "a/b/c", "a/b/c/f.txt"]
        assert creates.index("a") < creates.index("a/b") < creates.index("a/b/c")
        others = [p for p in pairs(without_chmod_of(events, "a", "a/b", "a/b/c")) if p[0] != CREATE]
        assert others in ([], [(WRITE, "a/b/c/f.txt")]), pairs(events)
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_include_entry_attaches_entry_with_metadata(envd_url, watched):
    sbx = await AsyncSandbox.create()
    path = os.path.join(watched, "meta.txt")
    metadata = {"author": "async-watcher", "kind": "e2e"}
    handle, collector = await awatch(sbx, watched, include_entry=True)
    try:
        await sbx.files.write(path, "12345", metadata=metadata)
        # Let the write's events be described before the file goes away (an
        # entry is attached only while the path can still be described).
        await collector.wait_events(lambda evs: WRITE in of(evs, "meta.txt"), "WRITE of meta.txt")
        await sbx.files.remove(path)

        events = await collector.settle(sbx, watched)

        assert pairs(events) == [(CREATE, "meta.txt"), (WRITE, "meta.txt"), (REMOVE, "meta.txt")]
        create, write, remove = events
        check_file_entry(create.entry, path, 5, metadata)
        check_file_entry(write.entry, path, 5, metadata)
        assert remove.entry is None
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_stop_calls_on_exit_without_error_and_ends_events(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched)
    # Let the watch deliver something first: the SDK's event task must have
    # started for stop() to reach on_exit (a task cancelled before it ever ran
    # calls nothing).
    await sbx.files.write(os.path.join(watched, "before-stop.txt"), "x")
    before = pairs(await collector.settle(sbx, watched))
    assert before == [(CREATE, "before-stop.txt"), (WRITE, "before-stop.txt")]
    seen = len(collector.events)

    await handle.stop()

    assert await collector.wait_exit() is None
    assert collector.exits == [None]

    # A change after stop() reaches a second watcher but not the stopped one.
    other, other_collector = await awatch(sbx, watched)
    try:
        await sbx.files.write(os.path.join(watched, "after-stop.txt"), "x")
        await other_collector.settle(sbx, watched)
    finally:
        await other.stop()
    assert len(collector.events) == seen, pairs(collector.events[seen:])
    assert collector.exits == [None]


@pytest.mark.asyncio
async def test_async_removing_the_watched_directory_calls_on_exit_with_error(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched)
    try:
        await sbx.files.remove(watched)

        error = await collector.wait_exit()

        assert isinstance(error, SandboxException), repr(error)
        assert collector.exits == [error]
        assert pairs(collector.events) == [(REMOVE, ".")]
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_moving_the_watched_directory_away_calls_on_exit_with_error(envd_url, workdir, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched)
    try:
        await sbx.files.rename(watched, os.path.join(workdir, "moved-away"))

        error = await collector.wait_exit()

        assert isinstance(error, SandboxException), repr(error)
        assert collector.exits == [error]
        assert pairs(collector.events) == [(RENAME, ".")]
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_watch_missing_path_or_file_raises(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    file_path = os.path.join(workdir, "file.txt")
    await sbx.files.write(file_path, "x")
    collector = Collector()

    with pytest.raises(FileNotFoundException):
        await sbx.files.watch_dir(os.path.join(workdir, "missing"), on_event=collector.on_event)
    with pytest.raises(InvalidArgumentException):
        await sbx.files.watch_dir(file_path, on_event=collector.on_event)
    assert collector.events == []


@pytest.mark.asyncio
async def test_async_upload_in_progress_in_a_directory_moved_into_the_tree_is_not_reported(
    envd_url, workdir, watched
):
    sbx = await AsyncSandbox.create()
    inner = os.path.join(watched, "inner")
    parked = os.path.join(workdir, "parked")
    await sbx.files.make_dir(inner)
    handle, collector = await awatch(sbx, watched, recursive=True)
    try:

        async def body():
            yield b"first half, "
            await async_wait_until(lambda: upload_in_progress(inner), "the upload's file in inner")
            await sbx.files.rename(inner, parked)
            await sbx.files.rename(parked, inner)
            await collector.wait_events(lambda evs: (CREATE, "inner") in pairs(evs), "CREATE of inner")
            yield b"second half"

        await sbx.files.write(os.path.join(inner, "f.txt"), body())

        events = await collector.settle(sbx, watched)

        assert_no_upload_temp_names(events)
        assert pairs(events) == [
            (RENAME, "inner"),
            (CREATE, "inner"),
            (CREATE, "inner/f.txt"),
            (WRITE, "inner/f.txt"),
        ]
        with open(os.path.join(inner, "f.txt"), "rb") as f:
            assert f.read() == b"first half, second half"
    finally:
        await handle.stop()


@pytest.mark.asyncio
async def test_async_upload_temp_files_never_show_up(envd_url, watched):
    sbx = await AsyncSandbox.create()
    handle, collector = await awatch(sbx, watched, recursive=True)
    try:
        await sbx.files.write(os.path.join(watched, "m.txt"), "m")
        await sbx.files.write(os.path.join(watched, "m.txt"), "again")
        await sbx.files.write(os.path.join(watched, "o.bin"), b"o" * 100_000, use_octet_stream=True)
        await sbx.files.write_files(
            [
                {"path": os.path.join(watched, "x/y.txt"), "data": "y"},
                {"path": os.path.join(watched, "z.txt"), "data": "z"},
            ],
            gzip=True,
        )

        events = await collector.settle(sbx, watched)

        assert_no_upload_temp_names(collector.events)
        assert {e.name for e in events} == {"m.txt", "o.bin", "x", "x/y.txt", "z.txt"}
        assert of(events, "m.txt") == [CREATE, WRITE, CREATE, WRITE]
        assert of(events, "o.bin") == [CREATE, WRITE]
        assert of(events, "z.txt") == [CREATE, WRITE]
    finally:
        await handle.stop()
