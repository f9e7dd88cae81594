#!/usr/bin/env python3
"""Soak: mixed traffic at a fixed rate for a bounded time against a real gateway process, to
show that nothing grows without bound and nothing is lost.

Traffic (per second, by default 40 requests): plain and streamed chat completions, streams the
client abandons halfway, upstream errors and stalls (the mock's `fail` steering), `auto`
requests, an admin PATCH of the key, and - from a second, hostile client - the worst bodies
known to cost a serving lane (a body of 200k members, a 4 MiB prompt to `auto`).

Every 10 s it samples the gateway's RSS and open file descriptors, the key's reserved budget
and `tollgate_client_connections`. At the end it fails (exit 1) when:
  - RSS or descriptors kept growing: the last third of the samples averages more than 25 %
    above the middle third, and every one of the last three samples is a new high;
  - anything is still reserved once the traffic stopped;
  - the ledger's row count for the key differs from the number of requests the client sent
    (each request, answered, failed or abandoned, is one row);
  - the p99 latency of small requests while the hostile client runs is over BOUND_MS
    (default 50) - the lane fairness check.

    benches/soak.py [seconds, default 600] [requests per second, default 40]
    SKIP_BUILD=1 BOUND_MS=50 benches/soak.py 120

Everything runs on 127.0.0.1 and stops by itself.
"""
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = int(sys.argv[1]) if len(sys.argv) > 1 else 600
RATE = int(sys.argv[2]) if len(sys.argv) > 2 else 40
BOUND_MS = float(os.environ.get("BOUND_MS", "50"))
ADMIN = "soak-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env=None, log=None):
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True)


def request(port, method, path, body=None, token=None, stream=False, abandon=False, timeout=30):
    """Returns (status, seconds); an abandoned stream reads two events and closes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    started = time.monotonic()
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        if abandon:
            response.readline()
            response.readline()
            connection.sock.close()
            return response.status, time.monotonic() - started
        response.read()
        return response.status, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return 0, time.monotonic() - started
    finally:
        connection.close()


def chat(kind):
    body = {"model": "gpt-4o-mini", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Summarise the soak so far in one line."}]}
    if kind == "stream" or kind == "abandon":
        body["stream"] = True
        body["mock"] = {"reply_tokens": 60}
    elif kind == "error":
        body["mock"] = {"fail": random.choice(["500", "429", "cut"]), "retry_after": 0}
    elif kind == "stall":
        body["stream"] = True
        body["mock"] = {"fail": "stall", "cut_after": 2}
    elif kind == "auto":
        body["model"] = "auto"
    return body


def sample(pid, port, key_id):
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", f"/admin/keys/{key_id}", headers={"authorization": f"Bearer {ADMIN}"})
    reserved = json.loads(connection.getresponse().read())["reserved_usd"]
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    connection.close()
    open_connections = next((float(l.split()[-1]) for l in metrics.splitlines()
                             if l.startswith("tollgate_client_connections ")), 0.0)
    return {"rss_kib": rss, "fds": fds, "reserved_usd": reserved, "connections": open_connections}


def growing(values):
    third = max(len(values) // 3, 1)
    middle = values[third:2 * third] or values[:1]
    last = values[-third:]
    grew = sum(last) / len(last) > 1.25 * (sum(middle) / len(middle))
    highs = len(values) >= 3 and all(values[-i] >= max(values[:-i]) for i in (1, 2, 3))
    return grew and highs


def main():
    if os.environ.get("SKIP_BUILD") != "1":
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, timeout=1800)
    binary = os.path.join(ROOT, "target/release/tollgate")
    work = tempfile.mkdtemp(prefix="tollgate-soak-")
    children = []

    def stop(*_):
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(1)))
    try:
        mock_port, port = free_port(), free_port()
        children.append(start([binary, "mock-upstream", "--listen", f"127.0.0.1:{mock_port}"]))
        children[-1].stdout.readline()
        with open(os.path.join(ROOT, "routes.toml")) as example:
            config = example.read()
        config = config.replace("127.0.0.1:9099", f"127.0.0.1:{mock_port}")
        config = config.replace('data_dir = "data"', f'data_dir = "{work}/data"')
        path = os.path.join(work, "routes.toml")
        with open(path, "w") as out:
            out.write(config)
        env = dict(os.environ, TOLLGATE_ADMIN_TOKEN=ADMIN, OPENAI_API_KEY="sk-soak",
                   ANTHROPIC_API_KEY="sk-soak", TOLLGATE_LOG="warn")
        log = open(os.path.join(work, "gateway.log"), "w")
        gateway = start([binary, "serve", "--config", path, "--listen", f"127.0.0.1:{port}"], env=env, log=log)
        children.append(gateway)
        gateway.stdout.readline()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/admin/keys", body=json.dumps({"name": "soak", "budget_usd": 1000}),
                           headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
        key = json.loads(connection.getresponse().read())
        connection.close()
        secret, key_id = key["key"], key["id"]

        sent = [0]
        lock = threading.Lock()
        small_latencies = {"calm": [], "hostile": []}
        phase = ["calm"]
        deadline = time.monotonic() + DURATION
        samples = []

        def one(kind):
            if kind == "patch":
                request(port, "PATCH", f"/admin/keys/{key_id}", {"rpm": random.randint(100000, 200000)}, token=ADMIN)
                return
            with lock:
                sent[0] += 1
            status, seconds = request(port, "POST", "/v1/chat/completions", chat(kind), token=secret,
                                      abandon=(kind == "abandon"))
            if kind == "small" and status == 200:
                small_latencies[phase[0]].append(seconds)

        def hostile():
            members = "{" + ",".join(f'"x{i}":{i}' for i in range(200_000)) + ',"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
            prompt = ("plain words, and some code: fn main() { run(); } " * 90_000)[:4 * 1024 * 1024]
            while time.monotonic() < deadline and phase[0] == "hostile":
                with lock:
                    sent[0] += 2
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", "/v1/chat/completions", body=members,
                                   headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
                connection.getresponse().read()
                request(port, "POST", "/v1/chat/completions",
                        {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]},
                        token=secret, timeout=120)

        kinds = ["small"] * 10 + ["stream"] * 4 + ["abandon", "error", "stall", "auto", "auto"]
        next_sample = time.monotonic()
        started = time.monotonic()
        workers = []
        hostile_thread = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if phase[0] == "calm" and now - started > DURATION / 2:
                phase[0] = "hostile"
                hostile_thread = threading.Thread(target=hostile, daemon=True)
                hostile_thread.start()
            if now >= next_sample:
                samples.append(sample(gateway.pid, port, key_id))
                print(json.dumps({"t": round(now - started), **samples[-1]}), flush=True)
                next_sample += 10
            batch = [random.choice(kinds) for _ in range(RATE)] + ["patch"]
            for kind in batch:
                thread = threading.Thread(target=one, args=(kind,), daemon=True)
                thread.start()
                workers.append(thread)
                time.sleep(1 / (RATE + 1))
            workers = [w for w in workers if w.is_alive()]
        phase[0] = "done"
        for worker in workers:
            worker.join(timeout=60)
        if hostile_thread:
            hostile_thread.join(timeout=120)
        time.sleep(12)  # stalled streams time out, batched ledger writes commit
        final = sample(gateway.pid, port, key_id)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", f"/admin/usage?group_by=key&key_id={key_id}",
                           headers={"authorization": f"Bearer {ADMIN}"})
        usage = json.loads(connection.getresponse().read())
        rows = sum(row["requests"] for row in usage["data"])

        def p99(values):
            values = sorted(values)
            return values[min(len(values) - 1, int(len(values) * 0.99))] * 1000 if values else float("nan")

        report = {
            "seconds": DURATION, "rate": RATE, "requests_sent": sent[0], "ledger_rows": rows,
            "rss_kib": [s["rss_kib"] for s in samples], "fds": [s["fds"] for s in samples],
            "reserved_after": final["reserved_usd"],
            "small_p99_ms": {"calm": round(p99(small_latencies["calm"]), 2),
                             "hostile": round(p99(small_latencies["hostile"]), 2)},
        }
        print(json.dumps(report, indent=2))
        failures = []
        if growing(report["rss_kib"]):
            failures.append("RSS kept growing")
        if growing(report["fds"]):
            failures.append("open descriptors kept growing")
        if final["reserved_usd"] != 0:
            failures.append(f"still reserved: {final['reserved_usd']}")
        if rows != sent[0]:
            failures.append(f"ledger rows {rows} != requests sent {sent[0]}")
        if report["small_p99_ms"]["hostile"] > BOUND_MS:
            failures.append(f"small-request p99 under hostile bodies {report['small_p99_ms']['hostile']} ms > {BOUND_MS} ms")
        for failure in failures:
            print("FAIL:", failure)
        return 1 if failures else 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
