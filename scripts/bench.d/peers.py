"""Peers for scripts/bench-compare --peers: LiteLLM proxy and Portkey's gateway, pinned, installed once
under the cache directory (a Python venv, an npm prefix), configured in front of the same aoai-sim
deployment as the gateway, and listening on 127.0.0.1 only."""

import json
import os
import subprocess
import sys

from compare import (LITELLM_VERSION, PORTKEY_VERSION, SIM_DEPLOYMENT, API, Target, free_port, log,
                     start, wait_ready, chat_body)

# Portkey's server binds every interface and has no flag for the address: this preload makes every
# listen() in that process use 127.0.0.1.
# litellm's `proxy` extra, without litellm-proxy-extras (see start_litellm).
PROXY_REQUIREMENTS = """
import importlib.metadata as m
from packaging.requirements import Requirement
for r in m.requires("litellm") or []:
    req = Requirement(r)
    if req.marker and req.marker.evaluate({"extra": "proxy"}) and req.name != "litellm-proxy-extras":
        print(str(req).split(";")[0])
"""

LOOPBACK_PRELOAD = """
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || typeof args[0] === 'string' && /^\\d+$/.test(args[0])) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1'; else args.splice(1, 0, '127.0.0.1');
  } else if (args[0] && typeof args[0] === 'object') {
    args[0] = { ...args[0], host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
"""


def run(argv, what):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed: {(r.stderr or r.stdout).strip()[-600:]}")


def venv_python(bench):
    venv = os.path.join(bench.a.cache, "venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        log(f"creating a Python venv in {venv}")
        run([sys.executable, "-m", "venv", venv], "python -m venv")
    return py


def start_litellm(bench):
    py = venv_python(bench)
    exe = os.path.join(os.path.dirname(py), "litellm")
    have = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True).stdout.strip()
    if have != LITELLM_VERSION:
        # The `proxy` extra pins litellm-proxy-extras (database migrations) to an exact version that a
        # package index may lack; the proxy runs here without a database, so the extra's other
        # requirements are installed by name, as litellm's own metadata lists them.
        log(f"installing litellm {LITELLM_VERSION} and its proxy requirements into the venv with pip")
        run([py, "-m", "pip", "install", "-q", f"litellm=={LITELLM_VERSION}", "packaging"], "pip install litellm")
        reqs = subprocess.run([py, "-c", PROXY_REQUIREMENTS], capture_output=True, text=True, check=True)
        run([py, "-m", "pip", "install", "-q", *reqs.stdout.split("\n")[:-1]], "pip install litellm's proxy requirements")
    port = free_port()
    key = "sk-bench-" + bench.client_key
    cfg = os.path.join(bench.work, "litellm.yaml")
    with open(cfg, "w") as f:
        json.dump({"model_list": [{"model_name": "gpt-4o", "litellm_params": {
            "model": f"azure/{SIM_DEPLOYMENT}", "api_base": bench.sim_url, "api_key": bench.backend_key,
            "api_version": API}}],
            "litellm_settings": {"telemetry": False, "drop_params": True},
            "general_settings": {"master_key": key}}, f)  # JSON is YAML
    workers = os.cpu_count() or 1
    p = start("litellm", [exe, "--config", cfg, "--host", "127.0.0.1", "--port", str(port),
                          "--num_workers", str(workers)], bench.work,
              env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True",
                   "NO_DOCS": "True"}, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    t = Target(f"LiteLLM {LITELLM_VERSION} ({workers} workers)", base, "/v1/chat/completions",
               {"authorization": f"Bearer {key}"}, model="gpt-4o", pid=p.pid)
    wait_ready(p, t.url, 180, headers={"content-type": "application/json", **t.headers}, method="POST",
               body=chat_body(model="gpt-4o"))
    return p, t


def start_portkey(bench):
    prefix = os.path.join(bench.a.cache, "portkey")
    server = os.path.join(prefix, "node_modules", "@portkey-ai", "gateway", "build", "start-server.js")
    pkg = os.path.join(prefix, "node_modules", "@portkey-ai", "gateway", "package.json")
    have = json.load(open(pkg)).get("version") if os.path.exists(pkg) else None
    if have != PORTKEY_VERSION:
        log(f"installing @portkey-ai/gateway@{PORTKEY_VERSION} with npm into {prefix}")
        os.makedirs(prefix, exist_ok=True)
        run(["npm", "install", "--prefix", prefix, "--no-audit", "--no-fund",
             f"@portkey-ai/gateway@{PORTKEY_VERSION}"], "npm install @portkey-ai/gateway")
    preload = os.path.join(bench.work, "loopback.cjs")
    with open(preload, "w") as f:
        f.write(LOOPBACK_PRELOAD)
    port = free_port()
    p = start("portkey", ["node", "--require", preload, server, f"--port={port}", "--headless"], bench.work,
              env={"NODE_ENV": "production"}, stdout=subprocess.DEVNULL)
    config = {"provider": "azure-openai", "api_key": bench.backend_key, "resource_name": "bench",
              "deployment_id": SIM_DEPLOYMENT, "api_version": API, "custom_host": bench.sim_url + "/openai"}
    base = f"http://127.0.0.1:{port}"
    t = Target(f"Portkey {PORTKEY_VERSION}", base, "/v1/chat/completions",
               {"x-portkey-config": json.dumps(config, separators=(",", ":"))}, model="gpt-4o", pid=p.pid)
    wait_ready(p, t.url, 60, headers={"content-type": "application/json", **t.headers}, method="POST",
               body=chat_body(model="gpt-4o"))
    return p, t
