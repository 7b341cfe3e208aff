#!/usr/bin/env python3
"""The side-by-side benchmark behind scripts/bench-compare (run that, not this).

Starts one zero-delay aoai-sim on 127.0.0.1, then one target at a time in front of it (the gateway
with each policy variant, and with --peers LiteLLM proxy and Portkey's gateway), and measures the
same chat completion with oha: closed loop at saturation, open loop at fixed rates with
coordinated-omission correction, streaming (added time to first byte with a small client of its
own, since oha reports whole-response latency only), a limited consumer with small and large
prompts, the full policy, and the scale pairs. Every process it starts is stopped on exit.
Results go to a JSON file; render.py turns that into BENCHMARKS.md and a plot. Standard library only.
"""

import argparse
import atexit
import http.server
import json
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = "2024-10-21"
SIM_DEPLOYMENT = "gpt4o-bench"
# Pinned peers: the versions the issue measured, so runs on different days compare.
LITELLM_VERSION = "1.109.1"
PORTKEY_VERSION = "1.15.2"

PROCS = []
FAILED = []
# With --tls: trusts the harness's CA, for the harness's own requests (readiness, checks, TTFB).
TLS_CONTEXT = None


def log(msg):
    print(f"bench-compare: {msg}", flush=True)


def stop_all():
    for p in reversed(PROCS):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in reversed(PROCS):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    PROCS.clear()


atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name, argv, workdir, env=None, stdout=None):
    """Starts a process in its own process group (so its children stop with it)."""
    logf = open(os.path.join(workdir, f"{name}.log"), "wb")
    p = subprocess.Popen(argv, stdout=stdout or logf, stderr=logf, env={**os.environ, **(env or {})},
                         start_new_session=True, cwd=workdir)
    p.bench_name = name
    p.bench_log = logf.name
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


def wait_ready(p, url, timeout, headers=None, method="GET", body=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{p.bench_name} exited during start-up:\n{tail(p.bench_log)}")
        try:
            req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
            with urllib.request.urlopen(req, timeout=2, context=TLS_CONTEXT) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{p.bench_name} not ready at {url} after {timeout} s:\n{tail(p.bench_log)}")


def proc_cpu_ticks(pid):
    """utime + stime of a process and its children so far (a peer may run several workers)."""
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def children(pid):
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split():
                    out.append(int(c))
                    out.extend(children(int(c)))
    except OSError:
        pass
    return out


def rss_kb(pid, key="VmRSS"):
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024 // 1024} GB"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            rev += " + uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        rev = "not a git checkout"
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory": mem, "kernel": platform.release(),
            "load_before": open("/proc/loadavg").read().split()[:3], "source": rev}


# --- certificates for --tls -------------------------------------------------------------------------

def make_certs(workdir):
    """A CA and a leaf it signs for 127.0.0.1 and localhost, made with the openssl CLI in `workdir`.
    RSA 2048, as the certificates of *.openai.azure.com. Returns (ca.pem, leaf.pem, leaf.key)."""
    if not shutil.which("openssl"):
        raise SystemExit("bench-compare: --tls needs the openssl command-line tool to make its test certificates "
                         "(Debian/Ubuntu: apt-get install openssl)")
    d = os.path.join(workdir, "tls")
    os.makedirs(d, exist_ok=True)

    def openssl(*argv):
        r = subprocess.run(["openssl", *argv], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {argv[0]} failed: {r.stderr.strip()[-500:]}")

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench-compare test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "leaf.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return tuple(os.path.join(d, n) for n in ("ca.pem", "leaf.pem", "leaf.key"))


# --- the OTLP sink ---------------------------------------------------------------------------------

class Sink(http.server.BaseHTTPRequestHandler):
    """A collector that is up: accepts OTLP/HTTP exports and counts them (and their bytes)."""
    exports = 0
    bytes = 0
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        Sink.exports += 1
        Sink.bytes += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def start_sink():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- requests --------------------------------------------------------------------------------------

PAD = " The quick brown fox jumps over the lazy dog by the river bank."  # 63 bytes, ~14 tokens


def chat_body(pad_bytes=0, stream=False, model=None):
    pad = PAD * (pad_bytes // len(PAD) + 1) if pad_bytes else ""
    body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Say hello in five words." + pad[:pad_bytes]}],
            "max_tokens": 16}
    if model:
        body["model"] = model
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


class Target:
    """Where one measured request goes: a URL, its headers, and a body per kind."""

    def __init__(self, name, base, path, headers, model=None, pid=None):
        self.name, self.base, self.path, self.headers, self.model, self.pid = name, base, path, headers, model, pid

    @property
    def url(self):
        return self.base + self.path


# --- oha ---------------------------------------------------------------------------------------------

class Oha:
    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        self.version = out
        helptext = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
        # Newer oha spells JSON output `--output-format json`; older ones `-j`.
        self.json_flag = ["--output-format", "json"] if "--output-format" in helptext else ["-j"]
        self.has_correction = "--latency-correction" in helptext
        self.has_no_tui = "--no-tui" in helptext
        # Without it, requests in flight at the end of `-z` are aborted and counted as errors.
        self.has_wait = "--wait-ongoing-requests-after-deadline" in helptext
        # HTTPS targets: trust the harness's CA (oha 1.16 has --cacert); an oha without it checks nothing.
        self.has_cacert = "--cacert" in helptext
        self.cacert = None

    def run(self, target, body, seconds, conns, rate=None):
        body_file = os.path.join(self.workdir, f"body-{len(body)}-{hash(body) & 0xffff}.json")
        with open(body_file, "wb") as f:
            f.write(body)
        argv = [self.binary, "-z", f"{seconds}s", "-c", str(conns), "-m", "POST", "-D", body_file,
                "-T", "application/json"]
        for k, v in target.headers.items():
            argv += ["-H", f"{k}: {v}"]
        if rate:
            argv += ["-q", str(rate)]
            if self.has_correction:
                argv.append("--latency-correction")
        if target.url.startswith("https://"):
            argv += ["--cacert", self.cacert] if self.has_cacert else ["--insecure"]
        if self.has_no_tui:
            argv.append("--no-tui")
        if self.has_wait:
            # With a per-request timeout, so that a target that hangs a request cannot hang the run.
            argv += ["--wait-ongoing-requests-after-deadline", "-t", "30s"]
        argv += self.json_flag + [target.url]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"oha failed ({r.returncode}): {r.stderr.strip()[:500]}")
        return json.loads(r.stdout)


def summarise(raw):
    s = raw.get("summary", {})
    pct = raw.get("latencyPercentiles", {})
    codes = {str(k): v for k, v in (raw.get("statusCodeDistribution") or {}).items()}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    # Requests cut by the end of the run are the generator's doing, not the target's.
    errors = sum(v for k, v in (raw.get("errorDistribution") or {}).items() if "deadline" not in k)

    def ms(key):
        v = pct.get(key)
        return None if v is None else round(v * 1000, 3)

    return {"rps": round(s.get("requestsPerSec") or 0, 1), "ok": ok, "non2xx": non2xx, "errors": errors,
            "error_kinds": list((raw.get("errorDistribution") or {}).keys())[:3],
            "p50_ms": ms("p50"), "p99_ms": ms("p99"), "p999_ms": ms("p99.9"),
            "mean_ms": None if s.get("average") is None else round(s["average"] * 1000, 3)}


# --- streaming: time to first byte ---------------------------------------------------------------

def ttfb(target, body, count, budget_s=10.0):
    """Sends `count` streamed requests one at a time on one keep-alive connection; returns the times
    from the request's last byte sent to the first SSE `data:` byte received, and to the stream's
    end, in ms. oha cannot see the first byte of a body, hence this client."""
    host, port = target.base.split("//", 1)[1].split(":")
    head = [f"POST {target.path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
            f"content-length: {len(body)}"] + [f"{k}: {v}" for k, v in target.headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    firsts, totals, failures = [], [], 0
    sock = None
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() - started > budget_s:
                break  # a slow target (a peer) gets fewer samples, not a longer run
            if failures > max(3, count // 10) or (failures >= 3 and not firsts):
                break  # that target does not stream: say so, do not wait out the whole count
            if sock is None:
                # A stream from a zero-delay simulator takes milliseconds: 5 s means it hangs.
                sock = socket.create_connection((host, int(port)), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if target.base.startswith("https://"):
                    # The handshake is done here, before the clock starts: TTFB on an open connection.
                    sock = TLS_CONTEXT.wrap_socket(sock, server_hostname=host)
            t0 = time.perf_counter()
            buf, first = b"", None
            try:
                sock.sendall(request)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise OSError("connection closed mid-stream")
                    buf += chunk
                    if first is None and b"data:" in buf:
                        first = time.perf_counter()
                    # Chunked transfer ends with a zero-length chunk; every target here streams chunked.
                    if buf.endswith(b"\r\n0\r\n\r\n"):
                        break
            except OSError:
                failures += 1
                sock.close()
                sock = None
                continue
            end = time.perf_counter()
            if not buf.startswith(b"HTTP/1.1 200") or first is None:
                failures += 1
                continue
            firsts.append((first - t0) * 1000)
            totals.append((end - t0) * 1000)
    finally:
        if sock is not None:
            sock.close()
    return firsts, totals, failures


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * p / 100))], 3)


# --- the run -----------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        # In memory where possible: 100,000 key files are slow to write and delete on a disk.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.work = tempfile.mkdtemp(prefix="gateway-bench-compare.", dir=shm)
        self.oha = Oha(args.oha, self.work)
        self.results = {"machine": machine(), "settings": {
            "profile": args.profile, "seconds": args.seconds, "connections": args.connections,
            "rates": args.rates, "smoke": args.smoke, "oha": self.oha.version,
            "co_correction": self.oha.has_correction, "large_consumers": args.large_consumers,
            "pinned": False, "tls": args.tls}, "runs": [], "streaming": [], "memory": [], "notes": []}
        self.backend_key = f"bench-backend-{random.getrandbits(32):x}"
        self.client_key = f"bench-client-{random.getrandbits(32):x}"
        self.loads = []
        self.sim_urls = []

    def cleanup(self):
        stop_all()
        if self.a.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # one measured run
    def measure(self, group, target, body, label=None, conns=None, rate=None, seconds=None, strict=True):
        seconds = seconds or self.a.seconds
        conns = conns or (max(self.a.connections, rate // 250 if rate else 0) if rate else self.a.connections)
        self.reset_sim()
        if not self.a.smoke:
            self.oha.run(target, body, 1, conns, rate)  # warm-up: connections, caches, tokenizer tables
            self.reset_sim()
        load = loadavg()
        self.loads.append(load)
        cpu0 = proc_cpu_ticks(target.pid) if target.pid else None
        try:
            res = summarise(self.oha.run(target, body, seconds, conns, rate))
        except RuntimeError as e:
            res = {"rps": 0, "ok": 0, "non2xx": 0, "errors": 1, "error_kinds": [str(e)[:200]]}
        if cpu0 is not None and res["ok"]:
            ticks = proc_cpu_ticks(target.pid) - cpu0
            res["cpu_us_per_req"] = round(ticks * 1e6 / os.sysconf("SC_CLK_TCK") / (res["ok"] + res["non2xx"]), 1)
        run = {"group": group, "target": target.name, "label": label or target.name, "conns": conns,
               "rate": rate, "seconds": seconds, "body_bytes": len(body), "load": load, **res}
        bad = res["non2xx"] or res["errors"] or not res["ok"]
        # An open-loop run that could not keep up shows as errors (oha's deadline) or a low rate: kept
        # and marked, it is a result (that target saturates), not a harness failure.
        run["status"] = "ok" if not bad else "saturated" if rate and res["ok"] else "FAIL"
        if run["status"] == "ok" and rate and res["rps"] < 0.9 * rate:
            run["status"] = "saturated"
        if run["status"] == "FAIL" and strict:
            FAILED.append(f"{group}/{run['label']}: {res}")
        self.results["runs"].append(run)
        p = lambda v: "-" if v is None else f"{v:.3f}"
        log(f"{group:<10} {run['label']:<28} c={conns:<4} rate={rate or '-':<5} {res['rps']:>9.0f} req/s "
            f"p50 {p(res.get('p50_ms'))} p99 {p(res.get('p99_ms'))} p99.9 {p(res.get('p999_ms'))} ms "
            f"non2xx={res['non2xx']} errors={res['errors']} load={load} [{run['status']}]")
        return run

    def reset_sim(self):
        for url in self.sim_urls:
            urllib.request.urlopen(urllib.request.Request(url + "/sim/reset", method="POST"), timeout=5,
                                   context=TLS_CONTEXT).close()

    # processes
    def start_sim(self, name="aoai-sim", tls=None):
        """Starts a simulator, over HTTPS with `tls` = (certificate, key); returns it and its direct
        target."""
        port = free_port()
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        argv = [self.a.sim, "--listen", f"127.0.0.1:{port}", "--region", "Loopback",
                # 1e12 TPM: never throttles in any run here (a 429 would fail the run, so it cannot go unseen).
                "--deployment", f"{SIM_DEPLOYMENT}=1000000000000", "--api-key", self.backend_key,
                "--token-delay-ms", "0",
                # Azure's compute is not on this machine: the simulator counts prompts as a token per
                # four bytes, so its CPU does not grow with the prompt (tiktoken takes ~70 ms for 1 MB,
                # which made the 1 MB runs measure the simulator).
                "--approximate-tokens"]
        if tls:
            argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        p = start(name, argv, self.work, env={"RUST_LOG": "warn"})
        wait_ready(p, url + "/sim/stats", 20)
        self.sim_urls.append(url)
        direct = Target("direct (TLS)" if tls else "direct", url,
                        f"/openai/deployments/{SIM_DEPLOYMENT}/chat/completions?api-version={API}",
                        {"api-key": self.backend_key}, pid=p.pid)
        return p, direct

    def policy(self, backends=1, consumers=1, limits=False, full=False, store="memory", redis_url=None,
               access_log=True, tls=None, sim_url=None):
        """A policy file; with `tls` = (CA, certificate, key) the gateway serves HTTPS with the
        certificate and trusts the CA for its backend (`sim_url`, an https:// simulator)."""
        port = free_port()
        sim_url = sim_url or self.sim_url
        lines = ["[gateway]", f'listen = "127.0.0.1:{port}"', "shutdown_grace_seconds = 1",
                 "max_body_bytes = 4194304", ""]
        if tls:
            ca, cert, key = tls
            lines += ["[gateway.tls]", f'certificate = "file:{cert}"', f'private_key = "file:{key}"', "",
                      "[upstream]", f'ca_file = "{ca}"', ""]
        if full or not access_log:
            lines += ["[telemetry]", f"access_log = {'true' if access_log else 'false'}"]
            if full:
                lines.append(f'otlp_endpoint = "http://127.0.0.1:{self.sink.server_address[1]}"')
            lines.append("")
        if store == "redis":
            lines += ["[rate_limit]", 'store = "redis"', f'redis_url = "{redis_url}"', ""]
        lines += ["[[deployments]]", 'name = "gpt-4o"', ""]
        for i in range(backends):
            lines += ["[[backends]]", f'name = "bench-sim-{i}"', 'region = "Loopback"',
                      f'endpoint = "{sim_url}"', 'api_key = "env:BENCH_BACKEND_KEY"',
                      "[backends.deployments]", f'"gpt-4o" = "{SIM_DEPLOYMENT}"', ""]
        keydir = os.path.join(self.work, f"keys-{consumers}")
        os.makedirs(keydir, exist_ok=True)
        for i in range(consumers):
            # The measured consumer is number 0; the others only make the tables large. Their keys are
            # files (100,000 environment variables would not fit in an environment).
            if i == 0:
                ref = "env:BENCH_CLIENT_KEY"
            else:
                ref = f"file:keys-{consumers}/{i}"
                path = os.path.join(keydir, str(i))
                if not os.path.exists(path):
                    with open(path, "w") as f:
                        f.write(f"bench-other-{i}-{self.client_key}")
            lines += ["[[consumers]]", f'name = "bench-{i}"', f'keys = ["{ref}"]']
            if limits:
                # Far above what any run sends: the limits are checked and counted, never hit.
                lines += ["[consumers.limits]", "tokens_per_minute = 1000000000000",
                          "requests_per_minute = 1000000000"]
            lines.append("")
        path = os.path.join(self.work, f"policy-{port}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path, port

    def start_gateway(self, name, **kw):
        path, port = self.policy(**kw)
        env = {"BENCH_BACKEND_KEY": self.backend_key, "BENCH_CLIENT_KEY": self.client_key,
               "OTEL_BSP_SCHEDULE_DELAY": "200"}
        # The access log (stdout) goes to /dev/null: its cost is the gateway's work, not the disk's.
        p = start(f"gateway-{name}", [self.a.gateway, "serve", "--policy", path], self.work, env=env,
                  stdout=subprocess.DEVNULL)
        base = f"{'https' if kw.get('tls') else 'http'}://127.0.0.1:{port}"
        wait_ready(p, base + "/readyz", 600)  # 100,000 consumers take a while to load
        t = Target(name, base, f"/openai/deployments/gpt-4o/chat/completions?api-version={API}",
                   {"api-key": self.client_key}, pid=p.pid)
        t.idle_rss_kb = rss_kb(p.pid)
        self.check(t)
        return p, t

    def check(self, t):
        """One request by hand: it must succeed and be served by the sim."""
        req = urllib.request.Request(t.url, data=chat_body(), method="POST",
                                     headers={"content-type": "application/json", **t.headers})
        with urllib.request.urlopen(req, timeout=30, context=TLS_CONTEXT) as r:
            body = r.read()
            if r.status != 200 or b"choices" not in body:
                raise RuntimeError(f"check request through {t.name} failed: {r.status} {body[:200]!r}")

    def memory(self, p, t):
        self.results["memory"].append({"target": t.name, "idle_rss_kb": getattr(t, "idle_rss_kb", None),
                                       "peak_rss_kb": rss_kb(p.pid, "VmHWM"), "rss_kb": rss_kb(p.pid)})

    # the groups
    def core(self, t):
        small = chat_body()
        for target in (self.direct, t):
            self.measure("closed", target, small)
        for rate in self.a.rates:
            for target in (self.direct, t):
                self.measure("open", target, small, rate=rate)

    def streaming(self, targets, strict=True):
        body = chat_body(stream=True)
        n = 200 if self.a.smoke else 2000
        for target in targets:
            body_t = chat_body(stream=True, model=target.model) if target.model else body
            self.reset_sim()
            ttfb(target, body_t, max(20, n // 10), budget_s=1.0)  # warm-up
            firsts, totals, failures = ttfb(target, body_t, n, budget_s=2.0 * self.a.seconds)
            entry = {"target": target.name, "requests": len(firsts) + failures, "failures": failures,
                     "ttfb_p50_ms": percentile(firsts, 50), "ttfb_p99_ms": percentile(firsts, 99),
                     "total_p50_ms": percentile(totals, 50), "total_p99_ms": percentile(totals, 99)}
            run = self.measure("stream", target, body_t, strict=strict)
            entry["closed_rps"] = run["rps"]
            self.results["streaming"].append(entry)
            log(f"stream     {target.name:<28} ttfb p50 {entry['ttfb_p50_ms']} p99 {entry['ttfb_p99_ms']} ms "
                f"(one at a time), {failures} failures")
            if failures and strict:
                FAILED.append(f"stream/{target.name}: {failures} failures")

    def tls(self):
        """TLS on both legs, as in production against *.openai.azure.com: the client speaks HTTPS to
        the gateway, the gateway HTTPS to a simulator of its own (certificates from a CA made for the
        run). The same closed- and open-loop runs and TTFB as group 1, direct and through the gateway."""
        global TLS_CONTEXT
        ca, cert, key = make_certs(self.work)
        TLS_CONTEXT = ssl.create_default_context(cafile=ca)
        self.oha.cacert = ca
        if not self.oha.has_cacert:
            self.results["notes"].append("this oha has no --cacert: the TLS runs used --insecure (certificates unchecked)")
        sim, direct = self.start_sim("aoai-sim-tls", tls=(cert, key))
        log(f"aoai-sim over TLS {direct.base}")
        p, gw = self.start_gateway("gateway-tls", tls=(ca, cert, key), sim_url=direct.base)
        gw.name = "gateway (TLS)"
        small = chat_body()
        for target in (direct, gw):
            self.measure("tls-closed", target, small)
        for rate in self.a.rates:
            for target in (direct, gw):
                self.measure("tls-open", target, small, rate=rate)
        self.streaming([direct, gw])
        self.memory(p, gw)
        stop(p)
        stop(sim)
        self.sim_urls.remove(direct.base)

    def run(self):
        a = self.a
        self.sink = start_sink()
        self.sim, self.direct = self.start_sim()
        self.sim_url = self.direct.base
        log(f"aoai-sim {self.sim_url}; oha {self.oha.version}; work dir {self.work}")

        # 1. the plain gateway: closed and open loop, streaming, body sizes
        p, gw = self.start_gateway("gateway")
        self.core(gw)
        self.streaming([self.direct, gw])
        for size, label in ((1024, "1 KB"), (1024 * 1024, "1 MB")):
            body = chat_body(pad_bytes=size - len(chat_body()))
            for target in (self.direct, gw):
                self.measure("bodies", target, body, label=f"{target.name} {label}",
                             conns=min(a.connections, 8) if size > 1024 else None)
        self.memory(p, gw)
        stop(p)

        # 1b. TLS on both legs, right after the plain figures it is compared with
        if a.tls:
            self.tls()

        # 2. the full policy: limits, metrics, access log, spans exported to a collector that is up
        p, full = self.start_gateway("full-policy", limits=True, full=True)
        full.name = "gateway (full policy)"
        self.measure("full", full, chat_body(), label="closed")
        for rate in a.rates:
            self.measure("full", full, chat_body(), label=f"{rate} req/s", rate=rate)
        self.memory(p, full)
        stop(p)
        self.results["settings"]["otlp_exports"] = Sink.exports
        if Sink.exports == 0:
            FAILED.append("full policy: the collector received no export")

        # 3. a limited consumer: the tokenizer's cost, small and ~4,000-token prompts
        p, lim = self.start_gateway("limited", limits=True)
        for pad, label in ((0, "small prompt (~25 tokens)"), (14 * 63 * 20, "large prompt (~4,000 tokens)")):
            body = chat_body(pad_bytes=pad)
            for target, name in ((self.direct, "direct"), (lim, "gateway, limited consumer")):
                self.measure("limited", target, body, label=f"{name}: {label}")
        stop(p)

        # 4. scale pairs
        for n in (3, 100):
            p, t = self.start_gateway(f"backends-{n}", backends=n)
            self.measure("scale", t, chat_body(), label=f"{n} backends")
            stop(p)
        redis = None
        if shutil.which("redis-server"):
            rport = free_port()
            redis = start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"], self.work)
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", rport), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or redis.poll() is not None:
                        raise RuntimeError(f"redis-server did not start:\n{tail(redis.bench_log)}")
                    time.sleep(0.05)
        else:
            self.results["notes"].append("redis-server not installed: the Redis store pair was skipped")
        stores = ["memory"] + (["redis"] if redis else [])
        for store in stores:
            for n in (10, a.large_consumers):
                kw = {"consumers": n, "limits": True, "store": store}
                if store == "redis":
                    kw["redis_url"] = f"redis://127.0.0.1:{rport}/0"
                t0 = time.monotonic()
                p, t = self.start_gateway(f"consumers-{n}-{store}", **kw)
                started = round(time.monotonic() - t0, 2)
                run = self.measure("scale", t, chat_body(), label=f"{n:,} consumers, {store} store")
                run["startup_s"] = started
                self.memory(p, t)
                stop(p)
        if redis:
            stop(redis)

        # 5. peers
        if a.peers:
            from peers import start_litellm, start_portkey
            for starter in (start_portkey, start_litellm):
                try:
                    p, t = starter(self)
                except Exception as e:  # a peer that cannot start is reported, not fatal
                    msg = f"{starter.__name__[6:]}: could not be set up or started: {e}"
                    log(msg)
                    self.results["notes"].append(msg)
                    continue
                self.measure("peers", t, chat_body(model=t.model), label=t.name, strict=False)
                self.streaming([t], strict=False)
                for rate in a.rates:
                    self.measure("peers-open", t, chat_body(model=t.model), label=t.name, rate=rate, strict=False)
                self.memory(p, t)
                stop(p)

        self.results["machine"]["load_while_measuring"] = [min(self.loads), max(self.loads)]
        self.results["machine"]["load_after"] = open("/proc/loadavg").read().split()[:3]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--sim", required=True)
    ap.add_argument("--oha", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--profile", default="release")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-render", action="store_true")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rates", default="500,1000,2000,4000")
    ap.add_argument("--large-consumers", type=int, default=100_000)
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "bench-results.json"))
    a = ap.parse_args()
    a.rates = [int(r) for r in a.rates.split(",") if r]
    if a.smoke:
        a.seconds, a.rates, a.large_consumers, a.no_render = 1, [200], 1000, True
        a.results = os.path.join(tempfile.gettempdir(), f"bench-compare-smoke-{os.getpid()}.json")
    if a.seconds < 1 or a.connections < 1 or a.large_consumers < 11:
        raise SystemExit("bench-compare: --seconds and --connections must be at least 1, --large-consumers at least 11")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # peers.py imports this file as `compare`: one module, one list of processes to stop.
    sys.modules.setdefault("compare", sys.modules[__name__])
    bench = Bench(a)
    try:
        bench.run()
    except RuntimeError as e:
        FAILED.append(str(e))
    finally:
        bench.cleanup()
    with open(a.results, "w") as f:
        json.dump(bench.results, f, indent=1)
    log(f"results: {a.results}")
    if not a.no_render:
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "render.py"),
                        a.results, "--cache", a.cache], check=False)
    if FAILED:
        log("FAILED:\n  " + "\n  ".join(FAILED))
        sys.exit(1)
    if a.smoke:
        os.remove(a.results)
    log("OK")


if __name__ == "__main__":
    main()
