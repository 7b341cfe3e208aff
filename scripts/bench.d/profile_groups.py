#!/usr/bin/env python3
"""Groups a folded profile (`perf script | inferno-collapse-perf`) of the gateway into the parts of its
hot path, and prints a Markdown table of their shares of the process's CPU samples.

Each stack goes to one group, decided in this order:
1. its thread, for the threads that are one part (the access-log writer, the OTLP exporter);
2. allocation, when the sampled frame is the allocator's (malloc, free, jemalloc internals);
3. the kernel, when the stack entered it (system calls, the loopback network, scheduling);
4. else the innermost frame that names a part (so JSON inside the access log is the access log's).

    python3 scripts/bench.d/profile_groups.py before.folded [after.folded]
"""

import re
import sys

THREADS = [
    ("access log (writer thread)", ("access-log",)),
    ("spans: OTLP export (exporter thread)", ("OpenTelemetry",)),
]

ALLOC = re.compile(r"(^|::)(_?rjem_|je_|malloc|free$|calloc|realloc|rallocx|sdallocx|__rust_alloc|__rust_dealloc|"
                   r"__rust_realloc|__rustc::__rust_(alloc|dealloc|realloc|no_alloc))|^_rjem|arena_|tcache")
KERNEL = re.compile(r"^(entry_SYSCALL|do_syscall_64|asm_|irq_|__sysvec|sysvec_|ret_from_fork)")

# (group, frame pattern), innermost match wins; checked in this order for one frame.
PARTS = [
    ("access log (on the request)", r"gateway_bin::observe::access_log"),
    ("metrics", r"(^|[<\s])metrics(_exporter_prometheus|_util)?::|gateway_bin::observe::(observation|service)"),
    ("spans: tracing/OpenTelemetry layers", r"tracing_opentelemetry|tracing_subscriber|tracing_core|opentelemetry|"
                                            r"sharded_slab|gateway_bin::telemetry"),
    ("JSON (request body parse)", r"serde_json"),
    ("limits: token estimate (tokenizer)", r"gateway_core::tokens|fancy_regex|regex_automata|regex::"),
    ("limits: store and layer", r"gateway_core::limits|gateway_layers::ratelimit"),
    ("URL parsing (upstream request)", r"(^|[<\s])url::|idna::|percent_encoding"),
    ("reqwest/hyper client", r"reqwest::|hyper_util::client|hyper::client|<hyper::proto::h1::role::Client"),
    ("hyper server and axum", r"hyper::|hyper_util::server|axum::|gateway_bin::serve::admission|httparse"),
    ("our layers (auth, context, failover, headers, record, pool)", r"gateway_layers::|gateway_core::|"
                                                                    r"gateway_bin::(reload|serve)"),
    ("tokio runtime", r"tokio::|mio::"),
]
PARTS = [(g, re.compile(p)) for g, p in PARTS]


def group(stack):
    frames = stack.split(";")
    thread = frames[0]
    for name, prefixes in THREADS:
        if thread.startswith(prefixes):
            return name
    leaf = frames[-1]
    if ALLOC.search(leaf):
        return "allocation (jemalloc)"
    if any(KERNEL.match(f) for f in frames):
        return "kernel: syscalls, loopback TCP, scheduling"
    for f in reversed(frames):
        for name, pat in PARTS:
            if pat.search(f):
                return name
    return "other (memcpy, libc, unattributed)"


def load(path):
    totals, all_ = {}, 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            g = group(stack)
            totals[g] = totals.get(g, 0) + n
            all_ += n
    return totals, all_


def main():
    profiles = [load(p) for p in sys.argv[1:]]
    names = sorted({g for t, _ in profiles for g in t}, key=lambda g: -profiles[0][0].get(g, 0))
    head = "| part | " + " | ".join(f"share ({p})" for p in sys.argv[1:]) + " |"
    print(head)
    print("|---|" + "---|" * len(profiles))
    for g in names:
        print(f"| {g} | " + " | ".join(f"{100 * t.get(g, 0) / a:.1f}%" for t, a in profiles) + " |")


if __name__ == "__main__":
    main()
