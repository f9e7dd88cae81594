#!/usr/bin/env bash
# Load comparison on loopback, all in one run so the figures share one machine state. The
# upstream is a stub cheaper than anything it judges: nginx answering from its config (fixed
# bodies captured once from tollgate's mock; the echo module writes a stream's 19 SSE events
# one by one, and waits 50 ms before the answer of the `slow` stub). In front of it:
#   stub             the stub itself, called directly (the floor),
#   nginx            nginx proxy_pass to the stub (the plain-proxy reference),
#   tollgate         tollgate with auth, caps, throttles, routing, counting, rating and the
#                    batched ledger on,
#   tollgate-strict  the same with `durability = "strict"` (group commit before each answer
#                    ends),
# for non-streaming and streaming ~1 KB chat requests and a streamed Responses API request,
# at 1 and 64 connections and at 64 connections paced by 20 ms of think time ("64p"), plus
# non-streaming at 1 connection in front of the 50 ms stub ("slow"). Each run also reads the
# target's own CPU time (/proc utime+stime over the run ÷ requests) and, for nginx and
# tollgate, its RSS idle and at peak.
#
# Every run is repeated ROUNDS times, the targets taking turns within a round, and the tables
# show medians: on a shared 2-core machine one run can be off by 20 %. Installs wrk, nginx and
# its echo module from Debian if missing. Ends with two fsync probes of the disk under the
# data dir: alone, and beside batched load.
#
#   benches/load.sh [seconds per run, default 5] [rounds, default 3]      (SKIP_BUILD=1 to reuse
#                                                                          target/release;
#                                                     PERF_RUN="chat 64" to profile one run;
#                                                     ONLY_ROWS="chat 64,stream 64" for a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-3}"

ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
NEED_APT=()
command -v wrk >/dev/null 2>&1 || NEED_APT+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || NEED_APT+=(nginx)
[ -f "$ECHO_MODULE" ] || NEED_APT+=(libnginx-mod-http-echo)
if [ "${#NEED_APT[@]}" -gt 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${NEED_APT[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet
# BIN=path/to/tollgate measures that build as `tollgate` (with SKIP_BUILD=1).
BIN=${BIN:-target/release/tollgate}
. benches/support/processes.sh

# A ~1 KB chat request, and the same prompt as a Responses request.
PROMPT=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 22).strip())')
chat_body() { # model stream
  echo '{"model":"'$1'","stream":'$2',"max_tokens":16,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"'$PROMPT'"}]}'
}
responses_body() { # model
  echo '{"model":"'$1'","stream":true,"max_output_tokens":16,"instructions":"You are a helpful assistant.","input":"'$PROMPT'"}'
}

# The stub's answers: what tollgate's mock answers to these requests, captured once.
MOCK_PORT=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
wait_port "$MOCK_PORT"
mkdir -p "$WORK/bodies"
curl -s "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" -d "$(chat_body gpt-4o-mini false)" >"$WORK/bodies/chat.json"
curl -s "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" -d "$(chat_body gpt-4o-mini true)" >"$WORK/bodies/chat.sse"
curl -s "http://127.0.0.1:$MOCK_PORT/v1/responses" -d "$(responses_body gpt-4o-mini)" >"$WORK/bodies/responses.sse"
kill "$MOCK_PID"; wait "$MOCK_PID" 2>/dev/null || true

# Ports: the stub's, then nginx's in front of each.
STUB_JSON=$(free_port) STUB_SSE=$(free_port) STUB_SLOW=$(free_port)
PROXY_JSON=$(free_port) PROXY_SSE=$(free_port) PROXY_SLOW=$(free_port)
mkdir -p "$WORK/stub" "$WORK/nginx"
python3 - "$WORK" "$ECHO_MODULE" "$STUB_JSON" "$STUB_SSE" "$STUB_SLOW" <<'PY'
import sys
work, module, json_port, sse_port, slow_port = sys.argv[1:]
def quoted(text):
    # nginx reads \n inside quotes as a newline; `$` would start a variable.
    assert "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
def events(path):
    body = open(f"{work}/bodies/{path}").read()
    chunks = [e + "\n\n" for e in body.split("\n\n") if e.strip()]
    return "\n".join(f"      echo -n {quoted(c)};\n      echo_flush;" for c in chunks)
chat = open(f"{work}/bodies/chat.json").read()
print(f"""load_module {module};
worker_processes 1;
pid {work}/stub/nginx.pid;
error_log {work}/stub/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/stub;
  server {{
    listen 127.0.0.1:{json_port} backlog=4096;
    location / {{ default_type application/json; return 200 {quoted(chat)}; }}
  }}
  server {{
    listen 127.0.0.1:{sse_port} backlog=4096;
    location /v1/responses {{
      default_type text/event-stream;
{events("responses.sse")}
    }}
    location / {{
      default_type text/event-stream;
{events("chat.sse")}
    }}
  }}
  server {{
    listen 127.0.0.1:{slow_port} backlog=4096;
    location / {{ default_type application/json; echo_sleep 0.05; echo -n {quoted(chat)}; }}
  }}
}}""", file=open(f"{work}/stub/nginx.conf", "w"))
PY
"$NGINX" -c "$WORK/stub/nginx.conf" -g 'daemon off;' &
STUB_PID=$!
PIDS+=($!)

proxy_server() { # listen upstream
  cat <<NGINX
  upstream u$1 { server 127.0.0.1:$2; keepalive 128; }
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / {
      proxy_pass http://u$1;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
NGINX
}
cat >"$WORK/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
$(proxy_server "$PROXY_JSON" "$STUB_JSON")
$(proxy_server "$PROXY_SSE" "$STUB_SSE")
$(proxy_server "$PROXY_SLOW" "$STUB_SLOW")
}
NGINX
"$NGINX" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PROXY_PID=$!
PIDS+=($!)
for port in "$STUB_JSON" "$STUB_SSE" "$STUB_SLOW" "$PROXY_JSON" "$PROXY_SSE" "$PROXY_SLOW"; do wait_port "$port"; done

# tollgate: one upstream per stub, one model per upstream (the model picks the stub, as the
# port does for nginx), prices of gpt-4o-mini and its tokenizer.
export TOLLGATE_ADMIN_TOKEN=bench-admin
start_gateway() { # durability [binary, directory]; sets PORT, KEY and GW_PID
  local dir="$WORK/${3:-$1}"
  PORT=$(free_port)
  mkdir -p "$dir"
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\ndata_dir = "%s/data"\nlog_format = "json"\n' "$PORT" "$dir"
    [ "${3:-}" != b ] || printf '%b\n' "${B_SERVER:-}"
    printf '\n'
    printf '[ledger]\ndurability = "%s"\n\n' "$1"
    for stub in json:"$STUB_JSON" stream:"$STUB_SSE" slow:"$STUB_SLOW"; do
      printf '[upstreams.%s]\nbase_url = "http://127.0.0.1:%s/v1"\n\n' "${stub%:*}" "${stub#*:}"
      printf '[models."gpt-4o-mini-%s"]\nupstream = "%s"\ntier = "cheap"\nencoding = "o200k_base"\n' "${stub%:*}" "${stub%:*}"
      printf 'input_per_mtok = 0.15\ncached_input_per_mtok = 0.075\noutput_per_mtok = 0.60\n\n'
    done
    printf '[router]\ndefault = "cheap"\n'
  } >"$dir/routes.toml"
  TOLLGATE_LOG=warn "${2:-$BIN}" serve --config "$dir/routes.toml" >"$dir/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=($!)
  wait_port "$PORT"
  KEY=$(curl -s "http://127.0.0.1:$PORT/admin/keys" -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
    -H 'content-type: application/json' \
    -d '{"name":"bench","budget_usd":1000000,"budget_period":"month","rpm":100000000,"tpm":100000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
}
start_gateway strict
STRICT_PORT=$PORT STRICT_KEY=$KEY STRICT_PID=$GW_PID
start_gateway batched
GW_PORT=$PORT GW_KEY=$KEY
# BIN_B=path/to/another/tollgate adds `tollgate-b`, that build with the batched ledger, taking
# its turn beside the others in every round: an A/B comparison of two builds in one run.
# B_SERVER="workers = 1" adds lines to its [server] table (BIN_B=$BIN compares settings).
if [ -n "${BIN_B:-}" ]; then
  A_PID=$GW_PID
  start_gateway batched "$BIN_B" b
  B_PORT=$PORT B_KEY=$KEY B_PID=$GW_PID GW_PID=$A_PID
fi

rss_kib() { # pids…: summed VmRSS, or VmHWM with HWM=1
  local field=VmRSS total=0
  [ -n "${HWM:-}" ] && field=VmHWM
  for pid in "$@"; do
    total=$((total + $(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status")))
  done
  echo "$total"
}
process_tree() { echo "$1" $(pgrep -P "$1" || true); }
IDLE_RSS_NGINX=$(rss_kib $(process_tree "$PROXY_PID"))
IDLE_RSS_GW=$(rss_kib "$GW_PID")

THINK_MS=20
# Each kind of traffic: the request body's path and model suffix, and the stub and nginx port.
declare -A PATH_OF=([chat]=/v1/chat/completions [stream]=/v1/chat/completions [responses]=/v1/responses [slow]=/v1/chat/completions)
declare -A MODEL_OF=([chat]=json [stream]=stream [responses]=stream [slow]=slow)
declare -A STUB_OF=([chat]=$STUB_JSON [stream]=$STUB_SSE [responses]=$STUB_SSE [slow]=$STUB_SLOW)
declare -A PROXY_OF=([chat]=$PROXY_JSON [stream]=$PROXY_SSE [responses]=$PROXY_SSE [slow]=$PROXY_SLOW)
write_script() { # kind key name
  local model="gpt-4o-mini-${MODEL_OF[$1]}" body
  case $1 in
    chat | slow) body=$(chat_body "$model" false) ;;
    stream) body=$(chat_body "$model" true) ;;
    responses) body=$(responses_body "$model") ;;
  esac
  cat >"$WORK/post_$3_$1.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
wrk.body = '$body'
LUA
  { cat "$WORK/post_$3_$1.lua"; echo "function delay() return $THINK_MS end"; } >"$WORK/post_$3-paced_$1.lua"
}
for kind in chat stream responses slow; do
  write_script "$kind" "$GW_KEY" batched
  write_script "$kind" "$STRICT_KEY" strict
  [ -z "${BIN_B:-}" ] || write_script "$kind" "$B_KEY" b
done

cpu_ticks() { # pids…: utime + stime, in clock ticks
  local total=0
  for pid in "$@"; do total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat"))); done
  echo "$total"
}
TICK=$(getconf CLK_TCK)

port_of() { # target kind
  case $1 in
    stub) echo "${STUB_OF[$2]}" ;;
    nginx) echo "${PROXY_OF[$2]}" ;;
    tollgate) echo "$GW_PORT" ;;
    tollgate-strict) echo "$STRICT_PORT" ;;
    tollgate-b) echo "$B_PORT" ;;
  esac
}

script_of() { # target: which key's request scripts it is sent
  case $1 in
    tollgate-strict) echo strict ;;
    tollgate-b) echo b ;;
    *) echo batched ;;
  esac
}

run() { # name kind connections script pids…: prints "name p50 p99 mean rps errors cpu_us"
  local name=$1 kind=$2 conns=$3 script=$4
  shift 4
  local threads=$(( ${conns%p} < 2 ? 1 : 2 ))
  [ "${conns%p}" != "$conns" ] && script="$script-paced"
  local before=$(cpu_ticks "$@")
  # PERF_RUN="chat 64" (kind and connections) profiles tollgate's runs of that traffic into
  # PERF_OUT (default target/perf-load.data, the last round's): `perf report -i` reads it.
  # PERF_ARGS replaces `record -g` (e.g. "stat -e raw_syscalls:sys_enter" to count syscalls);
  # PERF_TARGET=nginx (or another target) profiles that one instead.
  local perf_pid=
  if [ "${PERF_RUN:-}" = "$kind $conns" ] && [ "$name" = "${PERF_TARGET:-tollgate}" ]; then
    perf ${PERF_ARGS:-record -g} -o "${PERF_OUT:-target/perf-load.data}" -p "$(IFS=,; echo "$*")" -- sleep "$DURATION" \
      >/dev/null 2>&1 &
    perf_pid=$!
  fi
  wrk -t"$threads" -c"${conns%p}" -d"${DURATION}s" --latency -s "$WORK/post_${script}_$kind.lua" \
    "http://127.0.0.1:$(port_of "$name" "$kind")${PATH_OF[$kind]}" >"$WORK/wrk.out" 2>&1
  [ -z "$perf_pid" ] || wait "$perf_pid"
  local after=$(cpu_ticks "$@")
  python3 - "$name" "$((after - before))" "$TICK" "$WORK/wrk.out" <<'PY'
import re, sys
name, ticks, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = open(sys.argv[4]).read()
def ms(value, unit):
    return float(value) / 1000 if unit == "us" else float(value) if unit == "ms" else float(value) * 1000
def lat(p):
    return ms(*re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M).groups())
mean = ms(*re.search(r"Latency\s+([\d.]+)(us|ms|s)", text).groups())
requests = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
# /proc counts CPU time in ticks (10 ms): below a few thousand requests a run's figure is noise.
cpu_us = ticks * 1e6 / tick / requests if requests >= 2000 else float("nan")
print("%s %.3f %.3f %.3f %.1f %s %.1f" % (name, lat(50), lat(99), mean, rps, errs.group(1) if errs else 0, cpu_us))
PY
}

run_target() { # name kind connections
  local script
  script=$(script_of "$1")
  case $1 in
    stub) run stub "$2" "$3" "$script" $(process_tree "$STUB_PID") ;;
    nginx) run nginx "$2" "$3" "$script" $(process_tree "$PROXY_PID") ;;
    tollgate) run tollgate "$2" "$3" "$script" "$GW_PID" ;;
    tollgate-strict) run tollgate-strict "$2" "$3" "$script" "$STRICT_PID" ;;
    tollgate-b) run tollgate-b "$2" "$3" "$script" "$B_PID" ;;
  esac
}

ROWS=("chat 1" "chat 64" "chat 64p" "stream 1" "stream 64" "stream 64p" "responses 1" "responses 64" "slow 1")
# ONLY_ROWS="chat 64,stream 64" runs just those rows (a quick check; the summary table needs all).
[ -z "${ONLY_ROWS:-}" ] || IFS=, read -r -a ROWS <<<"$ONLY_ROWS"
TARGETS=(stub nginx tollgate tollgate-strict)
[ -z "${BIN_B:-}" ] || TARGETS+=(tollgate-b)
# ONLY_TARGETS="nginx tollgate tollgate-b" runs just those (stub and nginx are the ratios' bases).
[ -z "${ONLY_TARGETS:-}" ] || read -r -a TARGETS <<<"$ONLY_TARGETS"

# A process's first requests pay for its lazily built state (thread-local caches, allocator
# pages, upstream connections), and wrk corrects for coordinated omission, so one slow request
# at 1 connection shows as a p99 of its whole duration: every target gets a discarded second
# of traffic first.
for kind in chat stream responses; do
  for target in "${TARGETS[@]}"; do
    wrk -t2 -c64 -d1s -s "$WORK/post_$(script_of "$target")_$kind.lua" \
      "http://127.0.0.1:$(port_of "$target" "$kind")${PATH_OF[$kind]}" >/dev/null 2>&1
  done
done

RESULTS="$WORK/results.txt"
# The hypervisor's steal over the rounds (the `cpu` line's 8th figure, of all its ticks): a
# busy host slows every target, the heavier ones most, so a run's ratios are read beside it.
steal_and_total() { awk '/^cpu / { print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
STEAL_BEFORE=$(steal_and_total)
for round in $(seq "$ROUNDS"); do
  # The two builds of an A/B swap places every other round, so that neither always runs
  # right after nginx: one 6-round check saw that slot measure ~5 % more CPU, a second (two
  # copies of one build) saw no bias beyond the rounds' ±10 %.
  ORDER=("${TARGETS[@]}")
  if [ $((round % 2)) -eq 0 ] && [[ " ${TARGETS[*]} " == *" tollgate "* && " ${TARGETS[*]} " == *" tollgate-b "* ]]; then
    for i in "${!ORDER[@]}"; do
      case ${ORDER[$i]} in
        tollgate) ORDER[$i]=tollgate-b ;;
        tollgate-b) ORDER[$i]=tollgate ;;
      esac
    done
  fi
  for row in "${ROWS[@]}"; do
    set -- $row
    for target in "${ORDER[@]}"; do
      run_target "$target" "$1" "$2" | sed "s/^/$1 $2 /" >>"$RESULTS"
    done
  done
done
# RESULTS_OUT=file keeps every round's figures (the tables below show medians).
[ -z "${RESULTS_OUT:-}" ] || cp "$RESULTS" "$RESULTS_OUT"
STEAL_AFTER=$(steal_and_total)
PEAK_RSS_NGINX=$(HWM=1 rss_kib $(process_tree "$PROXY_PID"))
PEAK_RSS_GW=$(HWM=1 rss_kib "$GW_PID")

python3 - "$RESULTS" "$STEAL_BEFORE $STEAL_AFTER" "$IDLE_RSS_NGINX" "$PEAK_RSS_NGINX" "$IDLE_RSS_GW" "$PEAK_RSS_GW" <<'PY'
import statistics, sys
results, rss = sys.argv[1], [int(v) / 1024 for v in sys.argv[3:]]
steal_before, total_before, steal_after, total_after = map(int, sys.argv[2].split())
steal = 100 * (steal_after - steal_before) / (total_after - total_before)
runs = {}
for line in open(results):
    kind, conns, name, *figures = line.split()
    runs.setdefault((kind, conns, name), []).append([float(f) for f in figures])
# Medians of every figure; the non-2xx column counts every round's errors.
med = {key: [statistics.median(run[i] for run in group) for i in range(6)] + [sum(run[4] for run in group)]
       for key, group in runs.items()}
# med[key] = p50, p99, mean, rps, (errors median), cpu_us, errors summed
print("| traffic | conns | target | p50 ms | p99 ms | mean ms | req/s | vs stub | vs nginx | p50 +ms vs nginx | p99 +ms vs nginx | CPU µs/req | non-2xx |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (kind, conns, name), m in med.items():
    s, n = med[(kind, conns, "stub")], med[(kind, conns, "nginx")]
    print("| %s | %s | %s | %.3f | %.3f | %.3f | %.0f | %.2f | %.2f | %+.3f | %+.3f | %.1f | %d |" % (
        kind, conns, name, m[0], m[1], m[2], m[3], m[3] / s[3], m[3] / n[3],
        m[0] - n[0], m[1] - n[1], m[5], m[6]))
print()
print("medians of %d rounds; the hypervisor stole %.1f %% of the CPU time meanwhile" % (len(next(iter(runs.values()))), steal))
# The CPU ratio round by round: its spread says how far one run's median can be trusted.
for kind in ("chat", "stream"):
    ours, theirs = runs.get((kind, "64", "tollgate")), runs.get((kind, "64", "nginx"))
    if ours and theirs:
        print("CPU per %s request vs nginx's, 64 conns, round by round: %s" % (
            kind, " ".join("%.2f×" % (a[5] / b[5]) for a, b in zip(ours, theirs))))
if not {("chat", "64"), ("stream", "64"), ("chat", "1"), ("slow", "1")} <= {key[:2] for key in med}:
    sys.exit(0)
def fig(kind, conns, name, i):
    return med[(kind, conns, name)][i]
print()
print("| figure | nginx proxy_pass | tollgate | goal |")
print("|---|---|---|---|")
for label, kind in (("CPU µs per non-streaming request, 64 conns", "chat"), ("CPU µs per 19-event stream, 64 conns", "stream")):
    print("| %s | %.1f | %.1f | ≤ 2× nginx (%.2f×) |" % (label, fig(kind, "64", "nginx", 5), fig(kind, "64", "tollgate", 5),
          fig(kind, "64", "tollgate", 5) / fig(kind, "64", "nginx", 5)))
for label, kind in (("req/s at 64 conns vs nginx, non-streaming", "chat"), ("req/s at 64 conns vs nginx, streaming", "stream")):
    print("| %s | 1.00 | %.2f | ≥ 0.6 |" % (label, fig(kind, "64", "tollgate", 3) / fig(kind, "64", "nginx", 3)))
stub = fig("slow", "1", "stub", 2)
print("| mean added latency, 1 conn, 50 ms upstream | %+.3f ms | %+.3f ms | ≤ nginx + 0.2 ms |" % (
    fig("slow", "1", "nginx", 2) - stub, fig("slow", "1", "tollgate", 2) - stub))
print("| added p99, 1 conn, 0 ms upstream (vs stub) | %+.3f ms | %+.3f ms | ≤ +0.5 ms |" % (
    fig("chat", "1", "nginx", 1) - fig("chat", "1", "stub", 1), fig("chat", "1", "tollgate", 1) - fig("chat", "1", "stub", 1)))
print("| RSS idle / peak under load (MiB) | %.0f / %.0f | %.0f / %.0f | ≤ 150 under load |" % tuple(rss))
PY

# Strict durability waits for an fsync per commit, so its tail is bounded below by the disk's.
# The same probe every run, alone and then beside a run of batched streaming load through the
# gateway (whose ledger commits without fsync): on a disk whose flushes stall under concurrent
# writes, the second line shows the stalls that strict commits cannot avoid. Each probe writes
# a fresh file, so both allocate the same way; on 2 busy cores the second also includes some
# wait for a CPU.
if [ -n "${ONLY_ROWS:-}" ]; then
  # A subset's summary: the builds' peak memory, for an A/B of a change to what they hold.
  echo "peak RSS (MiB): tollgate $((PEAK_RSS_GW / 1024))${B_PID:+, tollgate-b $(($(HWM=1 rss_kib "$B_PID") / 1024))}"
  exit 0
fi
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
run_target tollgate stream 64 >/dev/null
wait "$PROBE"
