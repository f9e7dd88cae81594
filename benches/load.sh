#!/usr/bin/env bash
# Load comparison on loopback, all in one run so the figures share one machine state:
#   (a) direct calls to the mock upstream,
#   (b) nginx proxy_pass in front of the same mock (the plain-proxy reference),
#   (c) tollgate with auth, caps, routing, metering and rating on (batched ledger),
#   (d) the same with `durability = "strict"` (group commit before the end of each response),
# for non-streaming and streaming 1 KB chat requests, and the same prompt as a streamed
# Responses API request (`responses` rows), at 1 and 64 connections, and at 64
# connections paced by 20 ms of think time after each answer ("64p"). Prints p50, p99 and
# requests/s with ratios to (a) and (b). At saturation a closed loop's latency is set by its
# throughput (Little's law), so strict's CPU cost shows as latency; the paced rows stay below
# saturation, where strict's added latency is the commit wait itself. Installs wrk and nginx from Debian if missing.
# Every run is repeated ROUNDS times, the targets taking turns within a round, and the table
# shows each figure's median: on a shared 2-core machine one run can be off by 20 %.
#
# Ends with two fsync probes of the disk under the data dir: alone, and beside batched load.
#
#   benches/load.sh [seconds per run, default 5] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-3}"

need() { command -v "$1" >/dev/null 2>&1 || NEED_APT+=("$2"); }
NEED_APT=()
need wrk wrk
need nginx nginx
if [ "${#NEED_APT[@]}" -gt 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${NEED_APT[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
BIN=target/release/tollgate
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

MOCK_PORT=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT"

export TOLLGATE_ADMIN_TOKEN=bench-admin
start_gateway() { # durability; sets PORT and KEY
  local dir="$WORK/$1"
  PORT=$(free_port)
  mkdir -p "$dir"
  sed -e "s#http://127.0.0.1:9099/v1#http://127.0.0.1:$MOCK_PORT/v1#" \
      -e "s#^data_dir = .*#data_dir = \"$dir/data\"#" \
      -e "s#^log_format = .*#log_format = \"json\"#" routes.toml >"$dir/routes.toml"
  printf '\n[ledger]\ndurability = "%s"\n' "$1" >>"$dir/routes.toml"
  TOLLGATE_LOG=warn "$BIN" serve --config "$dir/routes.toml" --listen "127.0.0.1:$PORT" >"$dir/gw.log" 2>&1 &
  PIDS+=($!)
  wait_port "$PORT"
  KEY=$(curl -s "http://127.0.0.1:$PORT/admin/keys" -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
    -H 'content-type: application/json' \
    -d '{"name":"bench","budget_usd":1000000,"budget_period":"month","rpm":100000000,"tpm":100000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
}
start_gateway strict
STRICT_PORT=$PORT STRICT_KEY=$KEY
start_gateway batched
GW_PORT=$PORT

NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
"$NGINX" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_port "$NGINX_PORT"

# A ~1 KB chat request.
PROMPT=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 22).strip())')
THINK_MS=20
write_script() { # name stream|responses key
  local body='{"model":"gpt-4o-mini","stream":'$2',"max_tokens":16,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"'$PROMPT'"}]}'
  [ "$2" = responses ] &&
    body='{"model":"gpt-4o-mini","stream":true,"max_output_tokens":16,"instructions":"You are a helpful assistant.","input":"'$PROMPT'"}'
  cat >"$WORK/post_$1_$2.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $3"
wrk.body = '$body'
LUA
  { cat "$WORK/post_$1_$2.lua"; echo "function delay() return $THINK_MS end"; } >"$WORK/post_$1-paced_$2.lua"
}
for stream in false true responses; do
  write_script batched "$stream" "$KEY"
  write_script strict "$stream" "$STRICT_KEY"
done

run() { # name url stream|responses connections [script]
  local threads=$(( ${4%p} < 2 ? 1 : 2 )) seconds=$DURATION script=${5:-batched} path=/v1/chat/completions
  [ "$3" = responses ] && path=/v1/responses
  [ "${4%p}" != "$4" ] && script="$script-paced"
  [ "$1" = warm-up ] && seconds=1
  wrk -t"$threads" -c"${4%p}" -d"${seconds}s" --latency -s "$WORK/post_${script}_$3.lua" "$2$path" 2>&1 |
    python3 -c '
import re, sys
text = sys.stdin.read()
def lat(p):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v if u == "ms" else v * 1000
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print("%s %.3f %.3f %.1f %s" % (sys.argv[1], lat(50), lat(99), rps, errs.group(1) if errs else 0))
' "$1"
}

# A process's first requests pay for its lazily built state (thread-local caches, allocator
# pages, upstream connections), and wrk corrects for coordinated omission, so one slow request
# at 1 connection shows as a p99 of its whole duration: every target gets a discarded second
# of traffic first.
for stream in false true responses; do
  run warm-up "http://127.0.0.1:$MOCK_PORT" "$stream" 64 >/dev/null
  run warm-up "http://127.0.0.1:$NGINX_PORT" "$stream" 64 >/dev/null
  run warm-up "http://127.0.0.1:$GW_PORT" "$stream" 64 >/dev/null
  run warm-up "http://127.0.0.1:$STRICT_PORT" "$stream" 64 strict >/dev/null
done

RESULTS="$WORK/results.txt"
for round in $(seq "$ROUNDS"); do
  for stream in false true responses; do
    for conns in 1 64 64p; do
      run direct "http://127.0.0.1:$MOCK_PORT" "$stream" "$conns" | sed "s/^/$stream $conns /" >>"$RESULTS"
      run nginx "http://127.0.0.1:$NGINX_PORT" "$stream" "$conns" | sed "s/^/$stream $conns /" >>"$RESULTS"
      run tollgate "http://127.0.0.1:$GW_PORT" "$stream" "$conns" | sed "s/^/$stream $conns /" >>"$RESULTS"
      run tollgate-strict "http://127.0.0.1:$STRICT_PORT" "$stream" "$conns" strict | sed "s/^/$stream $conns /" >>"$RESULTS"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    stream, conns, name, *figures = line.split()
    runs.setdefault((stream, conns, name), []).append([float(f) for f in figures])
# Medians of the latencies and rates; the non-2xx column counts every round's errors.
rows = [[*key, *(statistics.median(run[i] for run in group) for i in range(3)),
         sum(run[3] for run in group)] for key, group in runs.items()]
by = {(r[0], r[1], r[2]): r for r in rows}
print("| stream | conns | target | p50 ms | p99 ms | req/s | req/s vs direct | req/s vs nginx | p50 +ms vs nginx | p99 +ms vs nginx | non-2xx (all rounds) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    stream, conns, name, p50, p99, rps, errs = r
    d = by[(stream, conns, "direct")]; n = by[(stream, conns, "nginx")]
    print("| %s | %s | %s | %.3f | %.3f | %.0f | %.2f | %.2f | %+.3f | %+.3f | %s |" % (
        stream, conns, name, float(p50), float(p99), float(rps),
        float(rps) / float(d[5]), float(rps) / float(n[5]),
        float(p50) - float(n[3]), float(p99) - float(n[4]), int(errs)))
print()
print("medians of %d rounds" % len(next(iter(runs.values()))))
print("strict durability vs batched (same traffic): added p50 / p99 in ms")
for r in rows:
    if r[2] == "tollgate-strict":
        b = by[(r[0], r[1], "tollgate")]
        print("  stream=%s conns=%s: %+.3f / %+.3f" % (r[0], r[1], float(r[3]) - float(b[3]), float(r[4]) - float(b[4])))
PY

# Strict durability waits for an fsync per commit, so its tail is bounded below by the disk's.
# The same probe every run, alone and then beside a run of batched streaming load through the
# gateway (whose ledger commits without fsync): on a disk whose flushes stall under concurrent
# writes, the second line shows the stalls that strict commits cannot avoid. Each probe writes
# a fresh file, so both allocate the same way; on 2 busy cores the second also includes some
# wait for a CPU.
cat >"$WORK/probe.py" <<'PY'
import os, sys, time
label, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_CREAT)
latencies, offset, started = [], 0, time.monotonic()
while time.monotonic() - started < seconds:
    os.pwrite(fd, b"x" * 4096, offset % (16 << 20))
    offset += 4096
    before = time.perf_counter()
    os.fsync(fd)
    latencies.append(time.perf_counter() - before)
    time.sleep(0.001)
os.close(fd)
latencies.sort()
at = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e3
print("disk, %s: fsync after a 4 KiB write, %d in %g s: p50 %.3f / p99 %.3f / p99.9 %.3f / max %.1f ms, %d over 10 ms"
      % (label, len(latencies), seconds, at(0.5), at(0.99), at(0.999), latencies[-1] * 1e3, sum(l > 0.01 for l in latencies)))
PY
python3 "$WORK/probe.py" idle "$WORK/fsync-probe-idle" "$DURATION"
python3 "$WORK/probe.py" "beside batched load" "$WORK/fsync-probe-load" "$DURATION" &
PROBE=$!
run load "http://127.0.0.1:$GW_PORT" true 64 >/dev/null
wait "$PROBE"
