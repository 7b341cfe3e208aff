#!/usr/bin/env python3
"""CPU per request and req/s of `gateway serve` builds, side by side (issue 12's hot-path profile).

Reuses compare.py's simulator, OTLP sink, policies and oha runs exactly (the plain policy and the
"full" one: limits, metrics, access log, spans exported to a collector that is up), so its numbers
compare with bench-compare's. Builds are alternated (A/B/A/B...) round after round, so that load from
other work on the machine falls on all of them alike. With --perf-data, `perf record -g` samples the
gateway during the full-policy run of the first build's first round (run as root).

    python3 scripts/bench.d/hotpath.py --sim target/release/aoai-sim --oha ~/.cargo/bin/oha \\
        --gateway before=/tmp/gateway-before --gateway after=target/release/gateway --rounds 3

Standard library only.
"""

import argparse
import os
import statistics
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", action="append", required=True, help="NAME=PATH, once per build")
    ap.add_argument("--sim", required=True)
    ap.add_argument("--oha", required=True)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="plain,full")
    ap.add_argument("--perf-data", help="perf.data to write for the first build's first full run")
    ap.add_argument("--perf-freq", type=int, default=999)
    a = ap.parse_args()
    builds = [g.split("=", 1) for g in a.gateway]
    policies = [p for p in a.policies.split(",") if p]
    args = types.SimpleNamespace(oha=a.oha, profile="release", seconds=a.seconds, connections=a.connections,
                                 rates=[], smoke=False, large_consumers=0, keep=False, tls=False, sim=a.sim)
    bench = compare.Bench(args)
    rows = []
    try:
        bench.sink = compare.start_sink()
        bench.start_sim()
        compare.log(f"aoai-sim {bench.sim_url}; oha {bench.oha.version}")
        direct = bench.measure("direct", bench.direct, compare.chat_body())
        rows.append(("direct", "-", 0, direct))
        for rnd in range(a.rounds):
            for name, path in builds:
                bench.a.gateway = path
                for policy in policies:
                    kw = {"limits": True, "full": True} if policy == "full" else {}
                    p, t = bench.start_gateway(f"{name}-{policy}", **kw)
                    t.name = f"{name} {policy}"
                    perf = None
                    if a.perf_data and rnd == 0 and name == builds[0][0] and policy == "full":
                        # After the warm-up the harness runs: sampling starts with the measured run.
                        bench.oha.run(t, compare.chat_body(), 1, a.connections)
                        perf = subprocess.Popen(["perf", "record", "-F", str(a.perf_freq), "-g", "-p", str(p.pid),
                                                 "-o", a.perf_data], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
                    run = bench.measure(policy, t, compare.chat_body())
                    if perf is not None:
                        perf.send_signal(2)
                        perf.wait(timeout=60)
                    rows.append((name, policy, rnd, run))
                    compare.stop(p)
        if not compare.Sink.exports and "full" in policies:
            compare.log("WARNING: the collector received no export")
    finally:
        bench.cleanup()
    print()
    print(f"{'build':<10} {'policy':<6} {'req/s (rounds)':<30} {'CPU us/req (rounds)':<30} load")
    for name in ["direct"] + [b[0] for b in builds]:
        for policy in (["-"] if name == "direct" else policies):
            runs = [r for n, pol, _, r in rows if n == name and pol == policy]
            rps = [r["rps"] for r in runs]
            cpu = [r.get("cpu_us_per_req") for r in runs if r.get("cpu_us_per_req") is not None]
            loads = [r["load"] for r in runs]
            fmt = lambda vs, f: " / ".join(f.format(v) for v in vs)
            med = lambda vs: f" (median {statistics.median(vs):.1f})" if len(vs) > 1 else ""
            print(f"{name:<10} {policy:<6} {fmt(rps, '{:.0f}') + med(rps):<30} {fmt(cpu, '{:.1f}') + med(cpu):<30} "
                  f"{fmt(loads, '{:.2f}')}")


if __name__ == "__main__":
    main()
