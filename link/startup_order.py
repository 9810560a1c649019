#!/usr/bin/env python3
"""Regenerates link/startup.ld: the functions the release daemon runs from exec to idle.

The linker (build.rs passes it the script) places these functions together, first in the
text, so that starting the daemon and answering its first /health faults in a few hundred
KiB of text rather than nearly all of it: the kernel maps text in 64 KiB windows around
each fault, and without an order the functions start-up runs sit in most windows of the
binary. A function missing from the list still runs, from wherever the linker put it; a
stale list costs idle RSS (the benchmark's `idle_rss` row shows it), never correctness.

Usage (needs valgrind, and perf for the second pass; takes a minute):

    CARGO_PROFILE_RELEASE_STRIP=false cargo build --release --locked
    link/startup_order.py target/release/envd

It starts the binary under callgrind the way the benchmark does (loopback, port 0, its own
state directory), asks /health once, lets it settle, stops it and lists every function of
the binary that ran. Valgrind runs one thread at a time, so paths that depend on timing
(a timer polled, a wake-up that comes early) may not run under it; a second pass runs the
binary natively a few times under perf, tracing page faults, and adds each function whose
code was first fetched outside the ordered text. The functions already in the script are
kept: running it again after a rebuild adds what the new layout brings out. Names are v0-mangled (.cargo/config.toml); what changes from build to
build in them becomes a wildcard (crate disambiguators and back-references, which move with
the toolchain and the dependencies' versions; the crate a generic was instantiated in;
LLVM's numeric suffixes), so the list survives a rebuild, a profile change (the stripped
and unstripped builds) and a toolchain or dependency update.
"""

import bisect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def run(binary):
    """Runs `binary` under callgrind (see `drive`); returns callgrind's output file."""
    work = tempfile.mkdtemp(prefix="envd-startup-order-")
    out = os.path.join(work, "callgrind.out")
    drive(binary, work, settle=2,
          wrapper=["valgrind", "--tool=callgrind", "--demangle=no",
                   "--callgrind-out-file=" + out])
    return out


def functions(callgrind_out, binary):
    """Functions of `binary` that have a cost in `callgrind_out`, in the order first seen.

    Callgrind does not always tell which object a function came from (it shows "???" for
    text the linker script moved), so a function counts when the binary defines it.
    """
    nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True,
                        check=True).stdout
    defined = {f[2] for f in (line.split() for line in nm.splitlines())
               if len(f) == 3 and f[1] in "tTwW"}
    names = {}  # (kind, id) -> name: callgrind compresses repeated names to "(id)"
    found = []

    def name(kind, text):
        match = re.match(r"\((\d+)\)\s*(.*)", text)
        if not match:
            return text
        if match.group(2):
            names[(kind, match.group(1))] = match.group(2)
        return names[(kind, match.group(1))]

    for line in open(callgrind_out, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith(("ob=", "cob=")):
            name("ob", line.split("=", 1)[1])
        elif line.startswith("cfn="):
            name("fn", line[4:])
        elif line.startswith("fn="):
            function = name("fn", line[3:])
            if function in defined and function not in found:
                found.append(function)
    return found


def fault_functions(binary, runs=5):
    """Functions of `binary` whose code took an instruction-fetch page fault in a native run
    (start, /health, settle), from perf's `exceptions:page_fault_user` tracepoint."""
    if shutil.which("perf") is None:
        print("perf not found: skipping the native pass", file=sys.stderr)
        return []
    sized = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True,
                           text=True, check=True).stdout
    symbols = sorted((int(f[0], 16), int(f[1], 16), f[3]) for f in
                     (line.split() for line in sized.splitlines())
                     if len(f) == 4 and f[2] in "tTwW")
    starts = [start for start, _, _ in symbols]
    found = []
    for _ in range(runs):
        work = tempfile.mkdtemp(prefix="envd-startup-faults-")
        data = os.path.join(work, "perf.data")
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-e", "exceptions:page_fault_user", "-o", data, "--",
             sys.executable, os.path.abspath(__file__), "--drive", binary, work],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recorder.wait()
        script = subprocess.run(
            ["perf", "script", "-i", data, "--show-mmap-events", "-F", "pid,trace"],
            capture_output=True, text=True).stdout
        # The daemon's executable mapping (start, end, file offset): the first process to
        # map the binary (the keepers it starts map it too, later).
        text = {}
        for line in script.splitlines():
            mmap = re.search(r"PERF_RECORD_MMAP2 (\d+)/\d+: \[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) "
                             r"@ (0x[0-9a-f]+|0) .*\]: r-xp (\S+)$", line)
            if (mmap and not text
                    and os.path.realpath(mmap.group(5)) == os.path.realpath(binary)):
                start, size = int(mmap.group(2), 16), int(mmap.group(3), 16)
                text[mmap.group(1)] = (start, start + size, int(mmap.group(4), 16))
                continue
            fault = re.match(r"\s*(\d+)\s+address=(0x[0-9a-f]+) ip=0x[0-9a-f]+ "
                             r"error_code=(0x[0-9a-f]+)", line)
            if not fault or fault.group(1) not in text:
                continue
            start, end, offset = text[fault.group(1)]
            address, error = int(fault.group(2), 16), int(fault.group(3), 16)
            if not (start <= address < end and error & 0x10):  # 0x10: an instruction fetch
                continue
            vaddr = file_to_vaddr(binary, address - start + offset)
            i = bisect.bisect_right(starts, vaddr) - 1
            if i >= 0 and vaddr < symbols[i][0] + symbols[i][1] and symbols[i][2] not in found:
                found.append(symbols[i][2])
    return found


def file_to_vaddr(binary, offset, _segments={}):
    """The virtual address of file offset `offset` in `binary`'s loadable segments."""
    if binary not in _segments:
        headers = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True,
                                 check=True).stdout
        _segments[binary] = [(int(f[1], 16), int(f[2], 16), int(f[4], 16))
                             for f in (line.split() for line in headers.splitlines())
                             if f and f[0] == "LOAD"]
    for file_offset, vaddr, size in _segments[binary]:
        if file_offset <= offset < file_offset + size:
            return offset - file_offset + vaddr
    return offset


def drive(binary, work, settle=1, wrapper=()):
    """One run the way the benchmark starts the daemon (loopback, port 0, state under
    `work`), behind `wrapper`: start, one /health, `settle` seconds, SIGTERM."""
    daemon = subprocess.Popen(
        [*wrapper, binary, "--addr", "127.0.0.1", "--port", "0",
         "--state-dir", os.path.join(work, "state"),
         "--upload-journal-dir", os.path.join(work, "uploads")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = json.loads(daemon.stdout.readline())["addr"]
    with urllib.request.urlopen(f"http://{addr}/health") as response:
        assert response.status == 204, response.status
    time.sleep(settle)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()


def existing_patterns(script):
    """The patterns `script` already orders."""
    if not os.path.exists(script):
        return []
    return re.findall(r"^    \*\(\.text\.(\S+) ", open(script, encoding="utf-8").read(), re.M)


def pattern(symbol):
    # v0: `Cs<hash>_` is a crate disambiguator, `B<offset>_` a back-reference into the
    # name (its offset moves when a disambiguator's length does).
    symbol = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", symbol)
    symbol = re.sub(r"B[0-9A-Za-z]*_", "B*_", symbol)
    # The crate a generic was instantiated in: LTO keeps one of the identical copies, and
    # which one changes from build to build.
    crate = re.search(r"Cs\*_([0-9]+)([A-Za-z0-9_]+)$", symbol)
    if crate and len(crate.group(2)) == int(crate.group(1)):
        symbol = symbol[: crate.start()] + "*"
    elif symbol.endswith("EB*_"):
        symbol = symbol[: -len("B*_")] + "*"
    # LLVM's suffixes for renamed local symbols (`.llvm.<hash>`, `.<n>`): they change with
    # every build.
    return re.sub(r"(\.llvm)?\.[0-9]+$", "*", symbol)


def main():
    if sys.argv[1] == "--drive":
        drive(sys.argv[2], sys.argv[3])
        return
    binary = sys.argv[1]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup.ld")
    found = functions(run(binary), binary)
    if len(found) < 100:
        sys.exit(f"only {len(found)} named functions ran: is {binary} stripped?")
    found += fault_functions(binary)
    patterns = existing_patterns(script)
    for symbol in found:
        if not re.fullmatch(r"[A-Za-z0-9_.$]+", symbol):
            continue  # "0x..." (no symbol: a stripped binary), valgrind's "(below main)"
        p = pattern(symbol)
        if p not in patterns:
            patterns.append(p)
    lines = [
        "/* Generated by link/startup_order.py: the functions the daemon runs from exec to",
        "   idle, placed first in the text. Regenerate it rather than editing it. */",
        "SECTIONS {",
        "  .text.idle : {",
        *(f"    *(.text.{p} .text.unlikely.{p})" for p in sorted(patterns)),
        "  }",
        "} INSERT BEFORE .text;",
    ]
    with open(script + ".tmp", "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(script + ".tmp", script)
    print(f"{script}: {len(patterns)} functions", file=sys.stderr)


if __name__ == "__main__":
    main()
