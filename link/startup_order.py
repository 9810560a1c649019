#!/usr/bin/env python3
"""Regenerates link/startup.ld: the functions the release daemon runs from exec to idle.

The linker (build.rs passes it the script) places these functions together, first in the
text, so that starting the daemon and answering its first /health faults in a few hundred
KiB of text rather than nearly all of it: the kernel maps text in 64 KiB windows around
each fault, and without an order the functions start-up runs sit in most windows of the
binary. A function missing from the list still runs, from wherever the linker put it; a
stale list costs idle RSS (the benchmark's `idle_rss` row shows it), never correctness.

Usage (needs valgrind; takes a minute):

    CARGO_PROFILE_RELEASE_STRIP=false cargo build --release --locked
    link/startup_order.py target/release/envd

It starts the binary under callgrind the way the benchmark does (loopback, port 0, its own
state directory), asks /health once, lets it settle, stops it and lists every function of
the binary that ran. Names are v0-mangled (.cargo/config.toml); what changes from build to
build in them becomes a wildcard (crate disambiguators and back-references, which move with
the toolchain and the dependencies' versions; the crate a generic was instantiated in;
LLVM's numeric suffixes), so the list survives a rebuild, a profile change (the stripped
and unstripped builds) and a toolchain or dependency update.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def run(binary):
    work = tempfile.mkdtemp(prefix="envd-startup-order-")
    out = os.path.join(work, "callgrind.out")
    daemon = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--demangle=no", "--callgrind-out-file=" + out,
         binary, "--addr", "127.0.0.1", "--port", "0",
         "--state-dir", os.path.join(work, "state"),
         "--upload-journal-dir", os.path.join(work, "uploads")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = json.loads(daemon.stdout.readline())["addr"]
    with urllib.request.urlopen(f"http://{addr}/health") as response:
        assert response.status == 204, response.status
    time.sleep(2)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
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
    binary = sys.argv[1]
    found = functions(run(binary), binary)
    patterns = []
    for symbol in found:
        if not re.fullmatch(r"[A-Za-z0-9_.$]+", symbol):
            continue  # "0x..." (no symbol: a stripped binary), valgrind's "(below main)"
        p = pattern(symbol)
        if p not in patterns:
            patterns.append(p)
    if len(patterns) < 100:
        sys.exit(f"only {len(patterns)} named functions ran: is {binary} stripped?")
    lines = [
        "/* Generated by link/startup_order.py: the functions the daemon runs from exec to",
        "   idle, placed first in the text. Regenerate it rather than editing it. */",
        "SECTIONS {",
        "  .text.idle : {",
        *(f"    *(.text.{p} .text.unlikely.{p})" for p in sorted(patterns)),
        "  }",
        "} INSERT BEFORE .text;",
    ]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup.ld")
    with open(script + ".tmp", "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(script + ".tmp", script)
    print(f"{script}: {len(patterns)} functions", file=sys.stderr)


if __name__ == "__main__":
    main()
