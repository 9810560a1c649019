"""Filesystem behaviour of envd as seen through the official E2B Python SDK.

Every test drives the daemon only through the SDK's public API and checks
the real outcome on disk with ``os`` / ``getfattr``.
"""

import io
import os
import stat
import subprocess

import pytest

from e2b import (
    AsyncSandbox,
    EntryInfo,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    WriteInfo,
)

from conftest import HOME

ALL_BYTES = bytes(range(256))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def e2b_xattrs(path: str) -> dict:
    """The ``user.e2b.*`` xattrs of ``path`` (prefix stripped), via getfattr."""
    out = subprocess.run(
        ["getfattr", "--absolute-names", "-e", "hex", "-d", "-m", r"^user\.e2b\.", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    attrs = {}
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        assert name.startswith("user.e2b."), line
        assert value.startswith("0x"), line
        attrs[name[len("user.e2b."):]] = bytes.fromhex(value[2:]).decode()
    return attrs


def read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_disk(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def names(entries):
    return [e.name for e in entries]


# --------------------------------------------------------------------------
# write + metadata
# --------------------------------------------------------------------------


def test_write_returns_write_info(sandbox, workdir):
    path = os.path.join(workdir, "hello.txt")

    info = sandbox.files.write(path, "hello world")

    assert isinstance(info, WriteInfo)
    assert info.name == "hello.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.metadata is None
    assert read_disk(path) == b"hello world"


def test_write_with_metadata_sets_e2b_xattrs(sandbox, workdir):
    path = os.path.join(workdir, "meta.txt")
    metadata = {"author": "mish", "purpose": "e2e test", "empty": ""}

    info = sandbox.files.write(path, "content", metadata=metadata)

    assert info.metadata == metadata
    assert e2b_xattrs(path) == metadata
    assert read_disk(path) == b"content"


def test_metadata_keys_are_lowercased(sandbox, workdir):
    path = os.path.join(workdir, "upper.txt")

    info = sandbox.files.write(path, "x", metadata={"Author": "Mish", "X-Tag": "V"})

    assert info.metadata == {"author": "Mish", "x-tag": "V"}
    assert e2b_xattrs(path) == {"author": "Mish", "x-tag": "V"}


def test_metadata_keys_differing_only_in_case_keep_the_first_value(sandbox, workdir):
    path = os.path.join(workdir, "case.txt")

    info = sandbox.files.write(path, "x", metadata={"Owner": "first", "owner": "second"})

    assert info.metadata == {"owner": "first"}
    assert e2b_xattrs(path) == {"owner": "first"}


def test_write_without_metadata_clears_previous_metadata(sandbox, workdir):
    path = os.path.join(workdir, "meta.txt")
    sandbox.files.write(path, "first", metadata={"author": "mish"})
    assert e2b_xattrs(path) == {"author": "mish"}

    info = sandbox.files.write(path, "second")

    assert info.metadata is None
    assert e2b_xattrs(path) == {}
    assert read_disk(path) == b"second"
    assert sandbox.files.get_info(path).metadata is None


def test_write_with_other_metadata_replaces_the_set(sandbox, workdir):
    path = os.path.join(workdir, "meta.txt")
    sandbox.files.write(path, "first", metadata={"author": "mish", "stage": "draft"})

    info = sandbox.files.write(path, "second", metadata={"stage": "final", "reviewer": "bob"})

    assert info.metadata == {"stage": "final", "reviewer": "bob"}
    assert e2b_xattrs(path) == {"stage": "final", "reviewer": "bob"}


def test_rewriting_metadata_keeps_foreign_user_xattrs(sandbox, workdir):
    path = os.path.join(workdir, "foreign.txt")
    sandbox.files.write(path, "first", metadata={"author": "mish"})
    os.setxattr(path, "user.other", b"keep me")

    sandbox.files.write(path, "second")

    assert os.getxattr(path, "user.other") == b"keep me"
    assert e2b_xattrs(path) == {}


def test_metadata_set_out_of_band_is_reported(sandbox, workdir):
    path = os.path.join(workdir, "oob.txt")
    write_disk(path, b"x")
    os.setxattr(path, "user.e2b.source", b"setfattr")
    os.setxattr(path, "user.unrelated", b"ignored")

    assert sandbox.files.get_info(path).metadata == {"source": "setfattr"}


def test_invalid_metadata_key_is_rejected_by_the_sdk(sandbox, workdir):
    path = os.path.join(workdir, "bad.txt")

    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(path, "x", metadata={"bad key": "v"})

    assert not os.path.exists(path)


def test_non_ascii_metadata_value_is_rejected_by_the_sdk(sandbox, workdir):
    path = os.path.join(workdir, "bad.txt")

    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(path, "x", metadata={"k": "caf\u00e9"})

    assert not os.path.exists(path)


def test_too_long_metadata_key_is_rejected_by_the_daemon(sandbox, workdir):
    # 246 bytes = 255 (xattr name limit) - len("user.e2b."); the SDK does not
    # check lengths, so this reaches envd, which must answer 400.
    path = os.path.join(workdir, "bad.txt")

    with pytest.raises(InvalidArgumentException, match="exceeds 246 bytes"):
        sandbox.files.write(path, "x", metadata={"k" * 247: "v"})

    assert not os.path.exists(path)


def test_oversized_metadata_is_rejected_before_anything_is_written(sandbox, workdir):
    path = os.path.join(workdir, "keep.txt")
    sandbox.files.write(path, "original", metadata={"author": "mish"})
    # total = sum(9 + len(key) + len(value)) = 9 + 1 + 4087 = 4097 > 4096
    too_big = {"k": "v" * 4087}

    with pytest.raises(InvalidArgumentException, match="4096"):
        sandbox.files.write(path, "replacement", metadata=too_big)

    assert read_disk(path) == b"original"
    assert e2b_xattrs(path) == {"author": "mish"}


def test_large_metadata_within_limits_is_accepted(sandbox, workdir):
    path = os.path.join(workdir, "limit.txt")
    # 9 + 1 + 1000 = 1010 per entry; three entries = 3030, well inside 4096
    # (and inside what ext4 stores in one block); a key of exactly 246 bytes.
    metadata = {"a": "x" * 1000, "b": "y" * 1000, "k" * 246: "z"}

    info = sandbox.files.write(path, "x", metadata=metadata)

    assert info.metadata == metadata
    assert e2b_xattrs(path) == metadata


# --------------------------------------------------------------------------
# write_files and upload modes
# --------------------------------------------------------------------------


def test_write_files_relative_and_absolute_paths(sandbox, workdir, home_name):
    abs_a = os.path.join(workdir, "a.txt")
    abs_b = os.path.join(workdir, "nested", "deeper", "b.bin")
    rel_c = f"{home_name}/c.txt"

    infos = sandbox.files.write_files(
        [
            {"path": abs_a, "data": "alpha"},
            {"path": rel_c, "data": "gamma"},
            {"path": abs_b, "data": b"\x00\x01beta"},
        ]
    )

    expected_c = os.path.join(HOME, home_name, "c.txt")
    assert [(i.name, i.path, i.type) for i in infos] == [
        ("a.txt", abs_a, FileType.FILE),
        ("c.txt", expected_c, FileType.FILE),
        ("b.bin", abs_b, FileType.FILE),
    ]
    assert read_disk(abs_a) == b"alpha"
    assert read_disk(expected_c) == b"gamma"
    assert read_disk(abs_b) == b"\x00\x01beta"


def test_write_relative_path_lands_in_root_home(sandbox, home_name):
    info = sandbox.files.write(home_name, "in home")

    assert info.path == os.path.join(HOME, home_name)
    assert read_disk(os.path.join(HOME, home_name)) == b"in home"


def test_write_files_applies_metadata_to_every_file(sandbox, workdir):
    paths = [os.path.join(workdir, n) for n in ("one.txt", "two.txt")]

    infos = sandbox.files.write_files(
        [{"path": p, "data": p} for p in paths], metadata={"batch": "7"}
    )

    assert [i.metadata for i in infos] == [{"batch": "7"}, {"batch": "7"}]
    for p in paths:
        assert e2b_xattrs(p) == {"batch": "7"}
        assert read_disk(p) == p.encode()


def test_write_files_octet_stream_one_request_per_file(sandbox, workdir, home_name):
    abs_a = os.path.join(workdir, "a.txt")
    rel_b = f"{home_name}/b.txt"

    infos = sandbox.files.write_files(
        [{"path": abs_a, "data": "A"}, {"path": rel_b, "data": "B"}],
        use_octet_stream=True,
        metadata={"mode": "octet"},
    )

    expected_b = os.path.join(HOME, home_name, "b.txt")
    assert [(i.path, i.metadata) for i in infos] == [
        (abs_a, {"mode": "octet"}),
        (expected_b, {"mode": "octet"}),
    ]
    assert read_disk(abs_a) == b"A"
    assert read_disk(expected_b) == b"B"


def test_write_files_to_the_same_path_twice_is_rejected(sandbox, workdir):
    path = os.path.join(workdir, "dup.txt")

    with pytest.raises(InvalidArgumentException, match="same path"):
        sandbox.files.write_files([{"path": path, "data": "1"}, {"path": path, "data": "2"}])

    # the first part was written before the duplicate was detected
    assert read_disk(path) == b"1"


def test_write_creates_missing_parent_directories(sandbox, workdir):
    path = os.path.join(workdir, "x", "y", "z.txt")

    sandbox.files.write(path, "deep")

    assert read_disk(path) == b"deep"
    assert stat.S_IMODE(os.stat(os.path.join(workdir, "x", "y")).st_mode) == 0o755


def test_write_overwrites_existing_file(sandbox, workdir):
    path = os.path.join(workdir, "over.txt")
    write_disk(path, b"a much longer original content")

    sandbox.files.write(path, "short")

    assert read_disk(path) == b"short"


def test_write_to_a_directory_is_rejected(sandbox, workdir):
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.write(workdir, "x")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="multipart"),
        pytest.param({"use_octet_stream": True}, id="octet-stream"),
        pytest.param({"gzip": True}, id="octet-stream-gzip"),
    ],
)
def test_all_byte_values_round_trip(sandbox, workdir, kwargs):
    path = os.path.join(workdir, "bytes.bin")
    payload = ALL_BYTES * 64

    info = sandbox.files.write(path, payload, **kwargs)

    assert info.path == path
    assert read_disk(path) == payload
    assert sandbox.files.read(path, format="bytes") == bytearray(payload)


def test_write_gzip_with_metadata(sandbox, workdir):
    path = os.path.join(workdir, "gz.txt")
    text = "compressible line\n" * 1000

    info = sandbox.files.write(path, text, gzip=True, metadata={"enc": "gzip"})

    assert info.metadata == {"enc": "gzip"}
    assert read_disk(path) == text.encode()
    assert e2b_xattrs(path) == {"enc": "gzip"}


def test_write_binary_file_like_object(sandbox, workdir):
    path = os.path.join(workdir, "filelike.bin")
    payload = ALL_BYTES * 1024

    info = sandbox.files.write(path, io.BytesIO(payload))

    assert info.path == path
    assert read_disk(path) == payload


def test_write_text_file_like_object(sandbox, workdir):
    path = os.path.join(workdir, "filelike.txt")

    sandbox.files.write(path, io.StringIO("text from a stream\n"))

    assert read_disk(path) == b"text from a stream\n"


def test_write_file_like_object_as_multipart(sandbox, workdir):
    path = os.path.join(workdir, "multipart.bin")

    sandbox.files.write(path, io.BytesIO(ALL_BYTES), use_octet_stream=False)

    assert read_disk(path) == ALL_BYTES


def test_write_real_file_object_gzip(sandbox, workdir):
    src = os.path.join(workdir, "src.bin")
    dst = os.path.join(workdir, "dst.bin")
    write_disk(src, ALL_BYTES * 300)

    with open(src, "rb") as f:
        sandbox.files.write(dst, f, gzip=True)

    assert read_disk(dst) == ALL_BYTES * 300


def test_write_iterable_of_chunks(sandbox, workdir):
    path = os.path.join(workdir, "chunks.bin")
    chunks = [b"first-", b"second-", ALL_BYTES]

    sandbox.files.write(path, iter(chunks))

    assert read_disk(path) == b"".join(chunks)


def test_write_empty_file(sandbox, workdir):
    path = os.path.join(workdir, "empty.txt")

    sandbox.files.write(path, b"")

    assert read_disk(path) == b""
    assert sandbox.files.read(path) == ""


def test_written_file_is_owned_by_root_with_mode_644(sandbox, workdir):
    path = os.path.join(workdir, "owned.txt")

    sandbox.files.write(path, "x")

    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(st.st_mode) == 0o644


# --------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------


def test_read_text(sandbox, workdir):
    path = os.path.join(workdir, "r.txt")
    write_disk(path, "héllo wörld\n".encode())

    assert sandbox.files.read(path) == "héllo wörld\n"


def test_read_bytes(sandbox, workdir):
    path = os.path.join(workdir, "r.bin")
    write_disk(path, ALL_BYTES)

    data = sandbox.files.read(path, format="bytes")

    assert isinstance(data, bytearray)
    assert data == bytearray(ALL_BYTES)


def test_read_stream(sandbox, workdir):
    path = os.path.join(workdir, "big.bin")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    write_disk(path, payload)

    with sandbox.files.read(path, format="stream") as stream:
        received = b"".join(stream)

    assert received == payload


def test_read_gzip(sandbox, workdir):
    path = os.path.join(workdir, "gz.txt")
    text = "repeat me " * 10000
    write_disk(path, text.encode())

    assert sandbox.files.read(path, gzip=True) == text
    assert sandbox.files.read(path, format="bytes", gzip=True) == bytearray(text.encode())


def test_read_stream_gzip(sandbox, workdir):
    path = os.path.join(workdir, "gz.bin")
    write_disk(path, ALL_BYTES * 4096)

    with sandbox.files.read(path, format="stream", gzip=True) as stream:
        assert b"".join(stream) == ALL_BYTES * 4096


def test_read_relative_path_resolves_in_home(sandbox, home_name):
    write_disk(os.path.join(HOME, home_name, "f.txt"), b"home file")

    assert sandbox.files.read(f"{home_name}/f.txt") == "home file"
    assert sandbox.files.read(f"~/{home_name}/f.txt") == "home file"


def test_read_missing_file_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(os.path.join(workdir, "missing.txt"))


def test_read_directory_is_invalid_argument(sandbox, workdir):
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.read(workdir)


def test_read_follows_symlink(sandbox, workdir):
    target = os.path.join(workdir, "target.txt")
    link = os.path.join(workdir, "link.txt")
    write_disk(target, b"through the link")
    os.symlink(target, link)

    assert sandbox.files.read(link) == "through the link"


# --------------------------------------------------------------------------
# get_info / exists
# --------------------------------------------------------------------------


def test_get_info_file(sandbox, workdir):
    path = os.path.join(workdir, "info.txt")
    sandbox.files.write(path, "12345", metadata={"author": "mish"})
    st = os.lstat(path)

    info = sandbox.files.get_info(path)

    assert isinstance(info, EntryInfo)
    assert info.name == "info.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode == 0o644
    assert info.permissions == "-rw-r--r--"
    assert info.owner == "root"
    assert info.group == "root"
    assert info.metadata == {"author": "mish"}
    assert info.symlink_target is None
    assert abs(info.modified_time.timestamp() - st.st_mtime_ns / 1e9) < 1e-5


def test_get_info_directory(sandbox, workdir):
    path = os.path.join(workdir, "sub")
    os.mkdir(path, 0o750)
    os.chmod(path, 0o750)

    info = sandbox.files.get_info(path)

    assert info.name == "sub"
    assert info.path == path
    assert info.type == FileType.DIR
    assert info.mode == 0o750
    assert info.permissions == "drwxr-x---"
    assert info.owner == "root"
    assert info.size == os.lstat(path).st_size
    assert info.metadata is None


def test_get_info_relative_path(sandbox, home_name):
    write_disk(os.path.join(HOME, home_name, "rel.txt"), b"x")

    info = sandbox.files.get_info(f"{home_name}/rel.txt")

    assert info.path == os.path.join(HOME, home_name, "rel.txt")
    assert info.type == FileType.FILE


def test_get_info_absolute_path_is_reported_as_given(sandbox, workdir):
    write_disk(os.path.join(workdir, "f.txt"), b"x")
    uncleaned = f"{workdir}/./f.txt"

    info = sandbox.files.get_info(uncleaned)

    assert (info.name, info.path) == ("f.txt", uncleaned)


def test_get_info_of_other_users_home_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.get_info("~nobody/x")


def test_get_info_missing_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(os.path.join(workdir, "nope"))


def test_exists(sandbox, workdir):
    path = os.path.join(workdir, "e.txt")
    write_disk(path, b"x")

    assert sandbox.files.exists(path) is True
    assert sandbox.files.exists(workdir) is True
    assert sandbox.files.exists(os.path.join(workdir, "missing")) is False


# --------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------


@pytest.fixture
def tree(workdir):
    """workdir/{a/{x,y/z}, b.txt, c/} built on disk."""
    write_disk(os.path.join(workdir, "a", "x"), b"x")
    write_disk(os.path.join(workdir, "a", "y", "z"), b"z")
    write_disk(os.path.join(workdir, "b.txt"), b"bbb")
    os.mkdir(os.path.join(workdir, "c"))
    return workdir


def test_list_depth_1(sandbox, tree):
    entries = sandbox.files.list(tree, depth=1)

    assert [(e.name, e.path, e.type) for e in entries] == [
        ("a", f"{tree}/a", FileType.DIR),
        ("b.txt", f"{tree}/b.txt", FileType.FILE),
        ("c", f"{tree}/c", FileType.DIR),
    ]
    assert entries[1].size == 3
    assert all(e.owner == "root" for e in entries)


def test_list_default_depth_is_1(sandbox, tree):
    assert names(sandbox.files.list(tree)) == ["a", "b.txt", "c"]


def test_list_depth_2_is_preorder_sorted(sandbox, tree):
    entries = sandbox.files.list(tree, depth=2)

    assert [(e.path, e.type) for e in entries] == [
        (f"{tree}/a", FileType.DIR),
        (f"{tree}/a/x", FileType.FILE),
        (f"{tree}/a/y", FileType.DIR),
        (f"{tree}/b.txt", FileType.FILE),
        (f"{tree}/c", FileType.DIR),
    ]


def test_list_depth_3_reaches_grandchildren(sandbox, tree):
    paths = [e.path for e in sandbox.files.list(tree, depth=3)]

    assert paths == [
        f"{tree}/a",
        f"{tree}/a/x",
        f"{tree}/a/y",
        f"{tree}/a/y/z",
        f"{tree}/b.txt",
        f"{tree}/c",
    ]


def test_list_paths_are_cleaned(sandbox, tree):
    paths = [e.path for e in sandbox.files.list(f"{tree}/./", depth=1)]

    assert paths == [f"{tree}/a", f"{tree}/b.txt", f"{tree}/c"]


def test_list_reports_metadata(sandbox, workdir):
    sandbox.files.write(os.path.join(workdir, "with.txt"), "1", metadata={"tag": "yes"})
    sandbox.files.write(os.path.join(workdir, "without.txt"), "2")

    entries = sandbox.files.list(workdir)

    assert [(e.name, e.metadata) for e in entries] == [
        ("with.txt", {"tag": "yes"}),
        ("without.txt", None),
    ]


def test_list_empty_directory(sandbox, workdir):
    assert sandbox.files.list(workdir) == []


def test_list_on_a_file_is_invalid_argument(sandbox, workdir):
    path = os.path.join(workdir, "file.txt")
    write_disk(path, b"x")

    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(path)


def test_list_missing_directory_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(os.path.join(workdir, "missing"))


def test_list_depth_0_rejected_by_the_sdk(sandbox, workdir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(workdir, depth=0)


# --------------------------------------------------------------------------
# make_dir / rename / remove
# --------------------------------------------------------------------------


def test_make_dir_creates_then_reports_existing(sandbox, workdir):
    path = os.path.join(workdir, "p", "q", "r")

    assert sandbox.files.make_dir(path) is True
    assert os.path.isdir(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert sandbox.files.get_info(path).type == FileType.DIR

    assert sandbox.files.make_dir(path) is False


def test_make_dir_over_a_file_is_invalid_argument(sandbox, workdir):
    path = os.path.join(workdir, "file")
    write_disk(path, b"x")

    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(path)

    assert read_disk(path) == b"x"


def test_make_dir_on_symlink_to_directory_reports_existing(sandbox, workdir):
    os.mkdir(os.path.join(workdir, "real"))
    os.symlink(os.path.join(workdir, "real"), os.path.join(workdir, "alias"))

    assert sandbox.files.make_dir(os.path.join(workdir, "alias")) is False


def test_rename_file(sandbox, workdir):
    old = os.path.join(workdir, "old.txt")
    new = os.path.join(workdir, "moved", "new.txt")
    sandbox.files.write(old, "payload", metadata={"author": "mish"})

    entry = sandbox.files.rename(old, new)

    assert entry.name == "new.txt"
    assert entry.path == new
    assert entry.type == FileType.FILE
    assert entry.metadata == {"author": "mish"}
    assert not os.path.lexists(old)
    assert read_disk(new) == b"payload"
    assert e2b_xattrs(new) == {"author": "mish"}
    assert sandbox.files.exists(old) is False


def test_rename_directory(sandbox, workdir):
    old = os.path.join(workdir, "d1")
    new = os.path.join(workdir, "d2")
    write_disk(os.path.join(old, "inner.txt"), b"inner")

    entry = sandbox.files.rename(old, new)

    assert (entry.name, entry.path, entry.type) == ("d2", new, FileType.DIR)
    assert not os.path.exists(old)
    assert read_disk(os.path.join(new, "inner.txt")) == b"inner"


def test_rename_replaces_existing_destination_file(sandbox, workdir):
    src = os.path.join(workdir, "src.txt")
    dst = os.path.join(workdir, "dst.txt")
    write_disk(src, b"new")
    sandbox.files.write(dst, "old", metadata={"stale": "yes"})

    entry = sandbox.files.rename(src, dst)

    assert entry.path == dst
    assert entry.metadata is None
    assert read_disk(dst) == b"new"
    assert not os.path.lexists(src)


def test_rename_missing_source_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(os.path.join(workdir, "ghost"), os.path.join(workdir, "new"))


def test_remove_file(sandbox, workdir):
    path = os.path.join(workdir, "rm.txt")
    write_disk(path, b"x")

    sandbox.files.remove(path)

    assert not os.path.lexists(path)
    assert sandbox.files.exists(path) is False


def test_remove_directory_recursively(sandbox, workdir):
    path = os.path.join(workdir, "dir")
    write_disk(os.path.join(path, "a", "b", "c.txt"), b"x")

    sandbox.files.remove(path)

    assert not os.path.lexists(path)


def test_remove_missing_path_succeeds(sandbox, workdir):
    sandbox.files.remove(os.path.join(workdir, "never-existed"))


def test_remove_symlink_keeps_target(sandbox, workdir):
    target = os.path.join(workdir, "t")
    link = os.path.join(workdir, "l")
    write_disk(os.path.join(target, "keep.txt"), b"k")
    os.symlink(target, link)

    sandbox.files.remove(link)

    assert not os.path.lexists(link)
    assert read_disk(os.path.join(target, "keep.txt")) == b"k"


# --------------------------------------------------------------------------
# symlinks
# --------------------------------------------------------------------------


def test_get_info_symlink_to_file(sandbox, workdir):
    target = os.path.join(workdir, "target.txt")
    link = os.path.join(workdir, "link")
    sandbox.files.write(target, "hello", metadata={"on": "target"})
    os.symlink("target.txt", link)  # relative link text

    info = sandbox.files.get_info(link)

    assert info.type == FileType.SYMLINK
    assert info.name == "link"
    assert info.path == link
    assert info.symlink_target == os.path.realpath(target)
    assert info.permissions == "Lrwxrwxrwx"
    assert info.size == len("target.txt")
    # mode and metadata are those of the target
    assert info.mode == 0o644
    assert info.metadata == {"on": "target"}


def test_get_info_symlink_chain_resolves_fully(sandbox, workdir):
    target = os.path.join(workdir, "real")
    os.mkdir(target)
    os.symlink(target, os.path.join(workdir, "hop1"))
    os.symlink(os.path.join(workdir, "hop1"), os.path.join(workdir, "hop2"))

    info = sandbox.files.get_info(os.path.join(workdir, "hop2"))

    assert info.type == FileType.SYMLINK
    assert info.symlink_target == os.path.realpath(target)


def test_get_info_broken_symlink(sandbox, workdir):
    link = os.path.join(workdir, "dangling")
    os.symlink(os.path.join(workdir, "nowhere"), link)

    info = sandbox.files.get_info(link)

    assert info.type == FileType.SYMLINK
    # resolution fails, so the target is reported as the link's own path
    assert info.symlink_target == link
    assert sandbox.files.exists(link) is True


def test_list_shows_symlinks(sandbox, workdir):
    write_disk(os.path.join(workdir, "file.txt"), b"f")
    os.mkdir(os.path.join(workdir, "dir"))
    os.symlink("file.txt", os.path.join(workdir, "to-file"))
    os.symlink(os.path.join(workdir, "dir"), os.path.join(workdir, "to-dir"))

    entries = {e.name: e for e in sandbox.files.list(workdir)}

    assert sorted(entries) == ["dir", "file.txt", "to-dir", "to-file"]
    assert entries["to-file"].type == FileType.SYMLINK
    assert entries["to-file"].symlink_target == os.path.realpath(os.path.join(workdir, "file.txt"))
    assert entries["to-dir"].type == FileType.SYMLINK
    assert entries["to-dir"].symlink_target == os.path.realpath(os.path.join(workdir, "dir"))
    assert entries["file.txt"].type == FileType.FILE
    assert entries["file.txt"].symlink_target is None
    assert entries["dir"].type == FileType.DIR


def test_list_does_not_descend_into_symlinked_dirs(sandbox, workdir):
    write_disk(os.path.join(workdir, "real", "inside.txt"), b"x")
    os.symlink(os.path.join(workdir, "real"), os.path.join(workdir, "alias"))

    paths = [e.path for e in sandbox.files.list(workdir, depth=2)]

    assert paths == [f"{workdir}/alias", f"{workdir}/real", f"{workdir}/real/inside.txt"]


def test_list_through_a_symlinked_directory(sandbox, workdir):
    write_disk(os.path.join(workdir, "real", "inside.txt"), b"x")
    alias = os.path.join(workdir, "alias")
    os.symlink(os.path.join(workdir, "real"), alias)

    entries = sandbox.files.list(alias)

    assert [(e.name, e.path) for e in entries] == [("inside.txt", f"{alias}/inside.txt")]


def test_write_through_symlink_writes_target_and_its_metadata(sandbox, workdir):
    target = os.path.join(workdir, "target.txt")
    link = os.path.join(workdir, "link.txt")
    write_disk(target, b"old")
    os.symlink(target, link)

    sandbox.files.write(link, "new", metadata={"via": "link"})

    assert os.path.islink(link)
    assert read_disk(target) == b"new"
    assert e2b_xattrs(target) == {"via": "link"}


# --------------------------------------------------------------------------
# async client
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_write_with_metadata_get_info_and_list(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    path = os.path.join(workdir, "async.txt")

    info = await sbx.files.write(path, "async data", metadata={"client": "async"})

    assert (info.path, info.metadata) == (path, {"client": "async"})
    assert e2b_xattrs(path) == {"client": "async"}

    entry = await sbx.files.get_info(path)
    assert (entry.type, entry.size, entry.metadata) == (FileType.FILE, 10, {"client": "async"})

    entries = await sbx.files.list(workdir)
    assert [(e.name, e.metadata) for e in entries] == [("async.txt", {"client": "async"})]


@pytest.mark.asyncio
async def test_async_read_formats(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    path = os.path.join(workdir, "async.bin")
    payload = ALL_BYTES * 100
    write_disk(path, payload)

    assert await sbx.files.read(path, format="bytes") == bytearray(payload)
    assert await sbx.files.read(path, format="bytes", gzip=True) == bytearray(payload)
    stream = await sbx.files.read(path, format="stream")
    async with stream:
        assert b"".join([chunk async for chunk in stream]) == payload


@pytest.mark.asyncio
async def test_async_write_files_gzip_and_file_like(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    a = os.path.join(workdir, "a.bin")
    b = os.path.join(workdir, "b.bin")

    infos = await sbx.files.write_files(
        [{"path": a, "data": ALL_BYTES}, {"path": b, "data": io.BytesIO(ALL_BYTES[::-1])}],
        gzip=True,
    )

    assert [i.path for i in infos] == [a, b]
    assert read_disk(a) == ALL_BYTES
    assert read_disk(b) == ALL_BYTES[::-1]


@pytest.mark.asyncio
async def test_async_errors(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    file_path = os.path.join(workdir, "f.txt")
    write_disk(file_path, b"x")

    with pytest.raises(FileNotFoundException):
        await sbx.files.read(os.path.join(workdir, "missing"))
    with pytest.raises(FileNotFoundException):
        await sbx.files.get_info(os.path.join(workdir, "missing"))
    with pytest.raises(InvalidArgumentException):
        await sbx.files.list(file_path)
    assert await sbx.files.exists(os.path.join(workdir, "missing")) is False


@pytest.mark.asyncio
async def test_async_make_dir_rename_remove(envd_url, workdir):
    sbx = await AsyncSandbox.create()
    d = os.path.join(workdir, "adir")

    assert await sbx.files.make_dir(d) is True
    assert await sbx.files.make_dir(d) is False
    entry = await sbx.files.rename(d, os.path.join(workdir, "bdir"))
    assert (entry.name, entry.type) == ("bdir", FileType.DIR)
    await sbx.files.remove(os.path.join(workdir, "bdir"))
    assert os.listdir(workdir) == []
