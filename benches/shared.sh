#!/usr/bin/env bash
# What shared state costs, on loopback, in one run so the figures share one machine state:
#   (a) `embedded`: tollgate with in-process state and the SQLite ledger (batched), as in load.sh,
#   (b) `shared`:   the same config plus `[state] backend = "redis"` and
#                   `[store] backend = "postgres"` (one replica; throwaway servers started here),
# for non-streaming ~1 KB chat requests (load.sh's body) at 1 and 64 connections. The two
# targets take turns within each of ROUNDS rounds and every cell is the median over rounds.
#
# Besides p50 / p99 / req/s it reports, for every run, the CPU each process spent per request
# (utime + stime from /proc, PostgreSQL summed over the postmaster and its backends), so a
# throughput gap can be split into gateway, Redis and PostgreSQL time; a baseline Redis round
# trip (redis-benchmark PING, 1 client); and, from one short 1-connection probe with Redis's
# slowlog threshold at 0, each Lua script's calls per request and its server-side time; the
# gateway's CPU by thread (lanes, the tokio runtime that drives the Redis client, the ledger
# writer); and, when `perf` works, one more 64-connection run per target profiled machine-wide.
#
# PostgreSQL runs with `synchronous_commit = off` (commits do not wait for the WAL flush), the
# nearest match to the batched SQLite ledger, which commits without fsync; Redis with no
# persistence. Installs wrk from Debian if missing. Bounded: the whole run stops after
# LIMIT seconds (default 20 min) and everything it started is stopped on exit (KEEP=1 keeps
# the gateways' logs and configs).
#
#   benches/shared.sh [seconds per run, default 5] [rounds, default 3]
#   SKIP_BUILD=1 PROFILE=0 KEEP=1 LIMIT=1200 benches/shared.sh ...   (all optional)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-3}"
LIMIT="${LIMIT:-1200}"

command -v wrk >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
}
for tool in redis-server redis-cli redis-benchmark python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PG_BIN/initdb" ] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql" >&2; exit 1; }

# SKIP_BUILD=1 reuses target/release/tollgate as it is (the build takes minutes on 2 cores).
[ "${SKIP_BUILD:-}" = 1 ] || timeout 1800 cargo build --release --quiet
BIN=target/release/tollgate
WORK=$(mktemp -d)
PG_DIR=$(mktemp -d /tmp/tollgate-bench-pg.XXXXXX)
PIDS=()
PG_STARTED=
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  # A gateway that died badly on SIGTERM says so here, before its log is removed.
  for log in "$WORK"/*/gw.log; do
    [ -f "$log" ] && grep -iE 'panic|abort' "$log" | sed "s#^#$(basename "$(dirname "$log")"): #" | tail -5 >&2 || true
  done
  if [ -n "$PG_STARTED" ]; then
    timeout 60 bash -c "$(declare -f as_pg); as_pg '$PG_BIN/pg_ctl' -D '$PG_DIR/data' stop -m immediate -t 30" >/dev/null 2>&1 || true
  fi
  wait 2>/dev/null || true
  rm -rf "$PG_DIR"
  if [ "${KEEP:-}" = 1 ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The time bound: TERM to this shell, whose trap stops everything else.
( trap 'kill "$s" 2>/dev/null; exit 0' TERM; sleep "$LIMIT" & s=$!; wait "$s" || exit 0
  echo "shared.sh: over its ${LIMIT}s limit, stopping" >&2; kill -TERM $$ ) 2>/dev/null &
PIDS+=($!)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# --- backing services --------------------------------------------------------------------
MOCK_PORT=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=($MOCK_PID)
wait_port "$MOCK_PORT"

REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK/redis" >"$WORK/redis/log" 2>&1 &
REDIS_PID=$!
PIDS+=($REDIS_PID)
wait_port "$REDIS_PORT"
rcli() { timeout 30 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

PG_PORT=$(free_port)
mkdir -p "$PG_DIR/socket"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$PG_DIR"
timeout 120 bash -c "$(declare -f as_pg); as_pg '$PG_BIN/initdb' -U tollgate --auth=trust --encoding=UTF8 --locale=C -D '$PG_DIR/data'" >"$WORK/initdb.log" 2>&1 ||
  { cat "$WORK/initdb.log" >&2; exit 1; }
PG_STARTED=1
timeout 120 bash -c "$(declare -f as_pg); as_pg '$PG_BIN/pg_ctl' start -w -t 60 -D '$PG_DIR/data' -l '$PG_DIR/log' \
  -o '-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR/socket -c synchronous_commit=off'" >/dev/null ||
  { cat "$PG_DIR/log" >&2; exit 1; }
PGCONNECT_TIMEOUT=10 timeout 60 "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U tollgate -d postgres \
  -c "CREATE DATABASE tollgate" >/dev/null
PG_PID=$(head -1 "$PG_DIR/data/postmaster.pid")

# --- the two gateways ---------------------------------------------------------------------
export TOLLGATE_ADMIN_TOKEN=bench-admin
start_gateway() { # name; sets PORT, KEY, GW_PID
  local dir="$WORK/$1"
  PORT=$(free_port)
  mkdir -p "$dir"
  sed -e "s#http://127.0.0.1:9099/v1#http://127.0.0.1:$MOCK_PORT/v1#" \
      -e "s#^data_dir = .*#data_dir = \"$dir/data\"#" \
      -e "s#^log_format = .*#log_format = \"json\"#" routes.toml >"$dir/routes.toml"
  printf '\n[ledger]\ndurability = "batched"\n' >>"$dir/routes.toml"
  if [ "$1" = shared ]; then
    cat >>"$dir/routes.toml" <<TOML

[state]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
lease_secs = 30
replicas = 1

[store]
backend = "postgres"
postgres_url = "postgres://tollgate@127.0.0.1:$PG_PORT/tollgate"
TOML
  fi
  TOLLGATE_LOG=warn "$BIN" serve --config "$dir/routes.toml" --listen "127.0.0.1:$PORT" >"$dir/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=($GW_PID)
  wait_port "$PORT"
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")" = 200 ] && break
    sleep 0.05
  done
  KEY=$(curl -s --max-time 30 "http://127.0.0.1:$PORT/admin/keys" -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
    -H 'content-type: application/json' \
    -d '{"name":"bench","budget_usd":1000000,"budget_period":"month","rpm":100000000,"tpm":100000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])') ||
    { echo "$1: cannot create a key" >&2; cat "$dir/gw.log" >&2; exit 1; }
}
start_gateway embedded
EMB_PORT=$PORT EMB_KEY=$KEY EMB_PID=$GW_PID
start_gateway shared
SHR_PORT=$PORT SHR_KEY=$KEY SHR_PID=$GW_PID

# load.sh's ~1 KB non-streaming chat request.
PROMPT=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 22).strip())')
for target in embedded shared; do
  key=$EMB_KEY; [ "$target" = shared ] && key=$SHR_KEY
  cat >"$WORK/post_$target.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '{"model":"gpt-4o-mini","stream":false,"max_tokens":16,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"$PROMPT"}]}'
LUA
done

# CPU ticks (utime + stime) of each process of interest; PostgreSQL is the postmaster, its
# live backends and what its exited children left in cutime/cstime.
cat >"$WORK/cpu.py" <<'PY'
import os, sys
def stat(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
def pg(root):
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        s = stat(pid)
        if s and (pid == root or str(s[0]) == root):
            total += s[1] + (s[2] if pid == root else 0)
    return total
names = sys.argv[1::2]; pids = sys.argv[2::2]
out = []
for name, pid in zip(names, pids):
    out.append(str(pg(pid) if name == "postgres" else (stat(pid) or (0, 0, 0))[1]))
with open("/proc/stat") as f:
    cpu = [int(x) for x in f.readline().split()[1:]]
out.append(str(sum(cpu) - cpu[3] - cpu[4]))  # busy ticks, whole machine
print(" ".join(out))
PY
# A gateway's CPU ticks by thread name (digits dropped: tollgate-lane-0 and -1 are one line).
cat >"$WORK/threads.py" <<'PY'
import os, re, sys
out = {}
for tid in os.listdir("/proc/%s/task" % sys.argv[1]):
    try:
        comm = open("/proc/%s/task/%s/comm" % (sys.argv[1], tid)).read().strip()
        text = open("/proc/%s/task/%s/stat" % (sys.argv[1], tid)).read()
    except OSError:
        continue
    f = text[text.rindex(")") + 2:].split()
    name = re.sub(r"[-_]?\d+$", "", comm)
    out[name] = out.get(name, 0) + int(f[11]) + int(f[12])
print(" ".join("%s=%d" % kv for kv in sorted(out.items())))
PY
TICK=$(getconf CLK_TCK)
cpu() { python3 "$WORK/cpu.py" gw_embedded "$EMB_PID" gw_shared "$SHR_PID" redis "$REDIS_PID" postgres "$PG_PID" mock "$MOCK_PID"; }

run() { # target connections seconds -> "p50 p99 rps requests non2xx cpu-deltas..."
  local port=$EMB_PORT threads=$(( $2 < 2 ? 1 : 2 ))
  [ "$1" = shared ] && port=$SHR_PORT
  local before after gw_pid=$EMB_PID threads_before
  [ "$1" = shared ] && gw_pid=$SHR_PID
  threads_before=$(python3 "$WORK/threads.py" "$gw_pid")
  before=$(cpu)
  # wrk's own CPU (µs) from the rusage of the python parent that waits for it.
  wrk_us=$(python3 -c 'import resource, subprocess, sys
subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
u = resource.getrusage(resource.RUSAGE_CHILDREN); print(int((u.ru_utime + u.ru_stime) * 1e6))' \
    "$WORK/wrk.out" timeout $(( $3 + 30 )) wrk -t"$threads" -c"$2" -d"$3s" --latency -s "$WORK/post_$1.lua" \
    "http://127.0.0.1:$port/v1/chat/completions")
  after=$(cpu)
  echo "$1 $2 $(grep -oE '^ *[0-9]+ requests in' "$WORK/wrk.out" | grep -oE '[0-9]+') | $threads_before | $(python3 "$WORK/threads.py" "$gw_pid")" >>"$WORK/threads.txt"
  python3 - "$WORK/wrk.out" "$before" "$after" "$wrk_us" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def lat(p):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v if u == "ms" else v * 1000
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
n = int(re.search(r"(\d+) requests in", text).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
deltas = [int(b) - int(a) for a, b in zip(sys.argv[2].split(), sys.argv[3].split())]
print("%.3f %.3f %.1f %d %s %s %s" % (lat(50), lat(99), rps, n, errs.group(1) if errs else 0, " ".join(map(str, deltas)), sys.argv[4]))
PY
}

# Warm-up: a discarded second per target (lazily built state, connection pools, script cache).
run embedded 64 1 >/dev/null
run shared 64 1 >/dev/null

# Redis's own per-command counters over the measured runs (only `shared` talks to it).
rcli CONFIG RESETSTAT >/dev/null
: >"$WORK/threads.txt"
RESULTS="$WORK/results.txt"
for round in $(seq "$ROUNDS"); do
  for conns in 1 64; do
    for target in embedded shared; do
      echo "$conns $target $(run "$target" "$conns" "$DURATION")" >>"$RESULTS"
    done
  done
done

cp "$WORK/threads.txt" "$WORK/threads-rounds.txt"
rcli INFO commandstats | tr -d '\r' >"$WORK/commandstats.txt"

# Where the CPU goes during one more 64-connection run per target (perf, when it works here):
# every process on the machine split into user and kernel time, and the gateway's own samples
# grouped by the crate their symbol belongs to. PROFILE=0 skips it.
PROFILE_MD="$WORK/profile.md"
: >"$PROFILE_MD"
if [ "${PROFILE:-1}" = 1 ] && command -v perf >/dev/null && timeout 10 perf record -q -o "$WORK/probe.data" -- true >/dev/null 2>&1; then
  cat >"$WORK/perf.py" <<'PY'
import re, subprocess, sys
target, data, tid_file = sys.argv[1], sys.argv[2], sys.argv[3]
owner = dict(line.split()[::-1] for line in open(tid_file))  # tid -> label
def report(*args):
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-F", "overhead,pid,dso,sym", *args],
                         capture_output=True, text=True, timeout=300).stdout
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+):(.+?)\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if m:
            tid, comm = m.group(2), m.group(3).strip()
            yield float(m.group(1)), owner.get(tid, "wrk" if comm == "wrk" else comm + " (not ours)"), m.group(4), m.group(5), m.group(6).strip()
rows = list(report())
by_comm = {}
for pct, comm, dso, kind, sym in rows:
    # tokio names its threads; fold them into their process.
    name = comm
    c = by_comm.setdefault(name, [0.0, 0.0]); c[kind == "k"] += pct
print("\n**perf, whole machine, 64 connections, %s** (%% of all samples; user / kernel):\n" % target)
print("| process | user % | kernel % | total % |")
print("|---|---|---|---|")
for name, (user, kernel) in sorted(by_comm.items(), key=lambda kv: -sum(kv[1]))[:8]:
    print("| %s | %.1f | %.1f | %.1f |" % (name, user, kernel, user + kernel))
crates = ["redis", "tokio_postgres", "postgres_protocol", "postgres", "hyper_util", "hyper", "h2", "tokio", "serde_json",
          "bpe", "tiktoken", "rusqlite", "sqlite", "tollgate", "reqwest", "combine", "futures", "bytes", "tracing"]
groups = {}
total = 0.0
for pct, comm, dso, kind, sym in rows:
    if comm != "gateway":
        continue
    total += pct
    if kind == "k":
        g = "kernel (syscalls, network)"
    elif "libc" in dso or "ld-linux" in dso:
        g = "libc (malloc, memcpy)"
    else:
        found = [(sym.find(c + "::"), c) for c in crates if sym.find(c + "::") >= 0]
        if found:
            g = min(found)[1]
        elif sym.startswith(("mi_", "_mi_")):
            g = "mimalloc"
        elif "sqlite3" in sym:
            g = "sqlite3 C"
        elif re.match(r"<?(core|alloc|std)::", sym):
            g = "core/alloc/std"
        elif re.search(r"\b(axum|tower|tower_service|futures_util|http)::", sym):
            g = "axum/tower/http/futures"
        else:
            g = "other"
    groups[g] = groups.get(g, 0.0) + pct
print("\n**perf, the %s gateway's own samples by crate** (%% of the gateway's samples):\n" % target)
print("| where | % |")
print("|---|---|")
for g, pct in sorted(groups.items(), key=lambda kv: -kv[1])[:12]:
    print("| %s | %.1f |" % (g, pct / total * 100 if total else 0))
PY
  for target in embedded shared; do
    pid=$EMB_PID; [ "$target" = shared ] && pid=$SHR_PID
    { for t in /proc/"$pid"/task/*; do echo "gateway ${t##*/}"; done
      for t in /proc/"$MOCK_PID"/task/*; do echo "mock ${t##*/}"; done
      for t in /proc/"$REDIS_PID"/task/*; do echo "redis-server ${t##*/}"; done
      echo "postgres $PG_PID"; pgrep -P "$PG_PID" | sed 's/^/postgres /'; } >"$WORK/tids-$target.txt"
    timeout $(( DURATION + 60 )) perf record -q -a -o "$WORK/perf-$target.data" -- sleep "$DURATION" >/dev/null 2>&1 &
    PERF=$!
    sleep 0.3
    run "$target" 64 $(( DURATION > 1 ? DURATION - 1 : 1 )) >/dev/null
    wait "$PERF" || true
    python3 "$WORK/perf.py" "$target" "$WORK/perf-$target.data" "$WORK/tids-$target.txt" >>"$PROFILE_MD" 2>/dev/null || true
  done
fi

# Redis's bare round trip on this machine, 1 client, no pipelining: the floor under each
# script call (a request makes its calls one after another, not pipelined).
timeout 60 redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -n 20000 -t ping --csv >"$WORK/ping.csv" 2>/dev/null || true

# One short 1-connection run against `shared` with every Redis command logged with its
# server-side duration; scripts are named by the SHA-1 of their text (as redis-rs loads them).
rcli CONFIG SET slowlog-max-len 100000 >/dev/null
rcli CONFIG SET slowlog-log-slower-than 0 >/dev/null
rcli SLOWLOG RESET >/dev/null
PROBE=$(run shared 1 1)
rcli CONFIG SET slowlog-log-slower-than 10000 >/dev/null
cat >"$WORK/slowlog.py" <<'PY'
import hashlib, os, socket, sys
port, scripts, requests = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
names = {}
prelude = open(os.path.join(scripts, "prelude.lua")).read()
for f in os.listdir(scripts):
    body = open(os.path.join(scripts, f)).read()
    names[hashlib.sha1(body.encode()).hexdigest()] = f[:-4]
    names[hashlib.sha1(("%s\n%s" % (prelude, body)).encode()).hexdigest()] = f[:-4]
s = socket.create_connection(("127.0.0.1", port), timeout=30)
s.sendall(b"*3\r\n$7\r\nSLOWLOG\r\n$3\r\nGET\r\n$6\r\n100000\r\n")
buf = s.makefile("rb")
def read():
    line = buf.readline().rstrip(b"\r\n")
    t, rest = line[:1], line[1:]
    if t in (b"+", b"-"): return rest.decode()
    if t == b":": return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0: return None
        return buf.read(n + 2)[:-2].decode(errors="replace")
    if t == b"*": return [read() for _ in range(int(rest))]
    raise ValueError(line)
entries = read()
# Redis 7 also logs the commands a script runs, each on its own entry just before the
# script's; a script's own duration includes theirs, so they are listed apart, never summed.
top, inner, pending = {}, {}, []
for e in reversed(entries):  # oldest first
    argv = e[3]
    cmd = argv[0].lower()
    if cmd in ("slowlog", "config"):
        continue
    if cmd in ("evalsha", "eval"):
        name = names.get(argv[1], argv[1][:8]) if cmd == "evalsha" else "(eval)"
        c = top.setdefault("script " + name, [0, 0, 0])
        c[0] += 1; c[1] += e[2]; c[2] += len(pending)
        pending = []
    else:
        pending.append(cmd)
# What is left unclaimed after the last script ran on its own (polls, pub/sub).
for cmd in pending:
    top.setdefault(cmd, [0, 0, 0])[0] += 1
for label, (calls, us, commands) in sorted(top.items(), key=lambda kv: -kv[1][1]):
    print("| %s | %.2f | %.1f | %.1f | %.1f |" % (label, calls / requests, us / max(calls, 1), us / requests, commands / max(calls, 1)))
calls = sum(c[0] for c in top.values()); us = sum(c[1] for c in top.values())
print("| **all** | **%.2f** | | **%.1f** | %.1f |" % (calls / requests, us / requests, sum(c[2] for c in top.values()) / max(calls, 1)))
if len(entries) >= 100000:
    print("\n(slowlog full: figures are a lower bound)")
PY
PROBE_REQ=$(echo "$PROBE" | cut -d' ' -f4)
python3 "$WORK/slowlog.py" "$REDIS_PORT" src/state/scripts "$PROBE_REQ" >"$WORK/slowlog.md"

# PostgreSQL's side: rows written and transactions committed over the whole run.
psql_q() { PGCONNECT_TIMEOUT=10 timeout 60 "$PG_BIN/psql" -X -q -A -t -h 127.0.0.1 -p "$PG_PORT" -U tollgate -d tollgate -c "$1" 2>/dev/null || echo "?"; }
PG_ROWS=$(psql_q "SELECT string_agg(relname || '=' || n_tup_ins, ' ' ORDER BY relname) FROM pg_stat_user_tables")
PG_XACT=$(psql_q "SELECT xact_commit FROM pg_stat_database WHERE datname = 'tollgate'")

python3 - "$RESULTS" "$WORK/ping.csv" "$WORK/slowlog.md" "$TICK" "$DURATION" "$ROUNDS" "$PG_ROWS" "$PG_XACT" "$WORK/commandstats.txt" "$PROFILE_MD" "$WORK/threads-rounds.txt" <<'PY'
import csv, re, statistics, sys
results, ping_csv, slowlog, tick, duration, rounds, pg_rows, pg_xact, cmdstats, _, _ = sys.argv[1:]
tick = int(tick)
runs = {}
for line in open(results):
    conns, target, *f = line.split()
    runs.setdefault((conns, target), []).append([float(x) for x in f])
# columns: 0 p50, 1 p99, 2 rps, 3 requests, 4 non-2xx; CPU ticks: 5 gateway embedded,
# 6 gateway shared, 7 redis, 8 postgres, 9 mock, 10 machine busy; 11 wrk µs
med = lambda group, i: statistics.median(r[i] for r in group)
print("### Shared state (Redis + PostgreSQL) vs embedded, non-streaming ~1 KB chat\n")
print("| conns | target | p50 ms | p99 ms | req/s | req/s shared/embedded | p50 +ms | p99 +ms | non-2xx (all rounds) |")
print("|---|---|---|---|---|---|---|---|---|")
for conns in ("1", "64"):
    e = runs[(conns, "embedded")]
    for target in ("embedded", "shared"):
        g = runs[(conns, target)]
        shared = target == "shared"
        print("| %s | %s | %.3f | %.3f | %.0f | %s | %s | %s | %d |" % (
            conns, target, med(g, 0), med(g, 1), med(g, 2),
            "**%.2f**" % (med(g, 2) / med(e, 2)) if shared else "1.00",
            "%+.3f" % (med(g, 0) - med(e, 0)) if shared else "",
            "%+.3f" % (med(g, 1) - med(e, 1)) if shared else "",
            sum(r[4] for r in g)))
print("\nMedians of %s rounds of %s s each, the two targets taking turns within a round." % (rounds, duration))

print("\n**CPU per request**, µs of utime+stime (median over rounds). `other` is the machine's busy")
print("time that none of the listed processes account for (anything else running on the VM):\n")
print("| conns | target | gateway | redis-server | postgres | mock | wrk | sum | other | machine busy, % of 2 cores |")
print("|---|---|---|---|---|---|---|---|---|---|")
for conns in ("1", "64"):
    for target in ("embedded", "shared"):
        g = runs[(conns, target)]
        gw = 5 if target == "embedded" else 6
        per = lambda f: statistics.median(f(r) / r[3] for r in g)
        us = lambda i: (lambda r: r[i] / tick * 1e6)
        known = lambda r: (r[gw] + r[7] + r[8] + r[9]) / tick * 1e6 + r[11]
        busy_pct = statistics.median(r[10] / tick / float(duration) / 2 * 100 for r in g)
        print("| %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f %% |" % (
            conns, target, per(us(gw)), per(us(7)), per(us(8)), per(us(9)), per(lambda r: r[11]),
            per(known), per(lambda r: r[10] / tick * 1e6 - known(r)), busy_pct))

print("\n**Gateway CPU by thread**, µs per request (median over rounds; lanes are the async workers that")
print("serve requests and drive the Redis client; `tollgate-usage` writes the ledger):\n")
threads = {}
for line in open(sys.argv[11]):
    head, before, after = line.split("|")
    target, conns, n = head.split()
    b = dict(kv.split("=") for kv in before.split()); a = dict(kv.split("=") for kv in after.split())
    threads.setdefault((conns, target), []).append({k: (int(a[k]) - int(b.get(k, 0))) / tick * 1e6 / int(n) for k in a})
names = sorted({k for runs_ in threads.values() for r in runs_ for k in r})
print("| conns | target | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
for conns in ("1", "64"):
    for target in ("embedded", "shared"):
        g = threads.get((conns, target), [])
        print("| %s | %s | %s |" % (conns, target, " | ".join("%.1f" % statistics.median(r.get(k, 0) for r in g) if g else "" for k in names)))

shared_requests = sum(r[3] for (c, t), g in runs.items() if t == "shared" for r in g)
print("\n**Redis, measured runs** (`INFO commandstats` over every `shared` run, %d requests; server-side time):\n" % shared_requests)
print("| command | calls / request | µs / call | µs / request |")
print("|---|---|---|---|")
for line in open(cmdstats):
    m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line)
    if m and m.group(1) in ("evalsha", "eval", "script|load", "ping", "get", "publish"):
        calls, usec = int(m.group(2)), int(m.group(3))
        print("| %s | %.2f | %.1f | %.1f |" % (m.group(1), calls / shared_requests, usec / max(calls, 1), usec / shared_requests))

ping = {}
try:
    for row in csv.reader(open(ping_csv)):
        if row and row[0].startswith("PING"):
            ping[row[0]] = row
except OSError:
    pass
print("\n**Redis round trip, bare** (`redis-benchmark -c 1 -n 20000 -t ping`, same machine, nothing else of ours running):\n")
print("| test | req/s | avg ms | p50 ms | p99 ms |")
print("|---|---|---|---|---|")
for name, row in ping.items():
    # test,rps,avg_latency_ms,min_latency_ms,p50_latency_ms,p95_latency_ms,p99_latency_ms,max_latency_ms
    print("| %s | %s | %s | %s | %s |" % (name, row[1], row[2], row[4], row[6]))
print("\n**Scripts per request** (1 connection for 1 s with Redis's slowlog threshold at 0 µs: a")
print("script's server-side time includes the commands it runs, and logging each of them slows it,")
print("so read the split, and take absolute figures from the table above):\n")
print("| script / command | calls / request | µs / call | µs / request | commands run inside / call |")
print("|---|---|---|---|---|")
print(open(slowlog).read().rstrip())
print(open(sys.argv[10]).read().rstrip())
print("\nPostgreSQL at the end: rows inserted %s; %s transactions committed in the database." % (pg_rows, pg_xact))
PY
