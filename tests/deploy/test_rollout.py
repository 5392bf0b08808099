"""Zero-loss rollouts behind a real load balancer: two replicas of the service (`python -m service`) on loopback
behind Debian's haproxy (deploy/haproxy/haproxy.cfg as shipped) or nginx (deploy/nginx/nginx.conf.template, filled in
as its comment says), under steady load; each replica in turn gets SIGTERM and is started again. Not one request may
fail. Behind haproxy, which health-checks /ready, not one may even need a retry: the service's own shutdown (503
on /ready at once, serving on for SEGMENT_SHUTDOWN_DELAY_S, then finishing what it accepted) is what keeps the
balancer from sending a request to a replica that is going away."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest

from ..conftest import FIXTURES
from ..live import ROOT, free_port, start_service


def system_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.path.exists(p)), None)


HAPROXY, NGINX = system_binary("haproxy"), system_binary("nginx")
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
DELAY_S = 5  # SEGMENT_SHUTDOWN_DELAY_S, as the config's comment says: above inter x fall = 2 s


def replica(path, port: int) -> subprocess.Popen:
    proc, _, _ = start_service({"SEGMENT_CHECKPOINT": str(path), "SEGMENT_DEVICE": "cpu",
                                "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1", "SEGMENT_PORT": str(port),
                                "SEGMENT_SHUTDOWN_DELAY_S": str(DELAY_S), "SEGMENT_LOG_LEVEL": "warning"},
                               stderr=subprocess.PIPE, text=True)
    return proc


def stats(url: str) -> dict[str, dict]:
    rows = csv.DictReader(io.StringIO(httpx.get(url, timeout=5).text.lstrip("# ")))
    return {r["svname"]: r for r in rows if r["pxname"] == "replicas"}


def wait_status(url: str, server: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stats(url)[server]["status"].startswith(status):
                return
        except httpx.TransportError:  # haproxy still starting
            pass
        time.sleep(0.2)
    raise TimeoutError(f"haproxy did not see {server} {status} within {timeout}s: {stats(url)[server]['status']}")


class Load:
    """`workers` clients posting the fixture image through the balancer back to back until stopped."""

    def __init__(self, url: str, workers: int = 3):
        self.url, self.results, self.stop = url, Counter(), threading.Event()
        self.image = next((FIXTURES / "camvid" / "images").iterdir()).read_bytes()
        self.threads = [threading.Thread(target=self.run) for _ in range(workers)]

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:  # keep-alive to haproxy, as real clients do
            while not self.stop.is_set():
                try:
                    r = client.post(self.url, files={"image": ("x.png", self.image, "image/png")})
                    ok = r.status_code == 200 and sum(c["pixels"] for c in r.json()["classes"]) > 0
                    self.results["ok" if ok else f"status {r.status_code}: {r.text[:200]}"] += 1
                except httpx.HTTPError as e:
                    self.results[f"{type(e).__name__}: {e}"] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def terminate(proc: subprocess.Popen, port: int) -> float:
    """SIGTERM a replica: /ready turns 503 'draining' at once (it still serves). Returns when the signal went."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["code"] == "draining"
    return t0


def restart(replicas: list, i: int, path, port: int, signalled: float) -> None:
    """Once replica i exits (not before the drain delay, and cleanly), start it again on its port."""
    replicas[i].wait(60)
    assert time.monotonic() - signalled >= DELAY_S
    assert "Traceback" not in replicas[i].stderr.read()
    replicas[i] = replica(path, port)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (`apt-get install haproxy`; .ci/run installs it)")
def test_rolling_both_replicas_behind_haproxy_loses_no_request(checkpoint, tmp_path):  # noqa: F811
    ports = [free_port(), free_port()]
    lb, stats_at = free_port(), free_port()
    replicas = [replica(checkpoint, p) for p in ports]
    env = {**os.environ, "SEGMENT_LB_BIND": f"127.0.0.1:{lb}", "SEGMENT_LB_STATS": f"127.0.0.1:{stats_at}",
           "SEGMENT_REPLICA_1": f"127.0.0.1:{ports[0]}", "SEGMENT_REPLICA_2": f"127.0.0.1:{ports[1]}"}
    assert subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env, capture_output=True).returncode == 0
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stats_url = f"http://127.0.0.1:{stats_at}/stats;csv"
    try:
        for server in ("replica1", "replica2"):
            assert haproxy.poll() is None, haproxy.stderr.read()
            wait_status(stats_url, server, "UP")
        with Load(f"http://127.0.0.1:{lb}/segment") as load:
            time.sleep(2)
            for i, server in enumerate(("replica1", "replica2")):
                signalled = terminate(replicas[i], ports[i])
                wait_status(stats_url, server, "DOWN")
                assert replicas[i].poll() is None  # still up: out of rotation before it stops accepting
                restart(replicas, i, checkpoint, ports[i], signalled)
                wait_status(stats_url, server, "UP")
                time.sleep(1)
        results = dict(load.results)
        assert results.pop("ok", 0) > 20 and not results, results
        for name, row in stats(stats_url).items():
            assert row["wretr"] in ("0", "") and row["wredis"] in ("0", ""), (name, row["wretr"], row["wredis"])
            assert row["econ"] in ("0", "") and row["eresp"] in ("0", ""), (name, row["econ"], row["eresp"])
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for p in replicas:
            if p.poll() is None:
                p.kill()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (`apt-get install nginx-light`; .ci/run installs it)")
def test_rolling_both_replicas_behind_nginx_loses_no_request(checkpoint, tmp_path):  # noqa: F811
    ports, lb = [free_port(), free_port()], free_port()
    replicas = [replica(checkpoint, p) for p in ports]
    values = {"SEGMENT_LB_LISTEN": f"127.0.0.1:{lb}", "SEGMENT_REPLICA_1": f"127.0.0.1:{ports[0]}",
              "SEGMENT_REPLICA_2": f"127.0.0.1:{ports[1]}"}
    # envsubst with the variables the template's comment lists: every other $name is nginx's own
    conf = tmp_path / "nginx.conf"
    conf.write_text(re.sub(r"\$\{(SEGMENT_\w+)\}", lambda m: values[m[1]], NGINX_TEMPLATE.read_text()))
    run = [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr",
           "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"]
    (tmp_path / "logs").mkdir()
    done = subprocess.run([*run[:-2], "-t"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    nginx = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{lb}/segment"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # nginx listening
            try:
                httpx.get(f"http://127.0.0.1:{lb}/ready", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        with Load(url) as load:
            time.sleep(2)
            for i in range(2):
                restart(replicas, i, checkpoint, ports[i], terminate(replicas[i], ports[i]))
                time.sleep(6)  # past fail_timeout: nginx tries the restarted replica again before the next goes
        results = dict(load.results)
        ok = results.pop("ok", 0)
    finally:
        nginx.terminate()
        log = nginx.communicate(timeout=10)[1]
        for p in replicas:
            if p.poll() is None:
                p.kill()
    assert ok > 20 and not results, (results, log[-3000:])
