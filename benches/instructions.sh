#!/usr/bin/env bash
# Instructions a proxied request costs tollgate in user space, counted by callgrind: the same
# count run after run, where the load script's CPU figures move ±5 % between rounds on this
# machine. It judges a small change to the request's path (a few allocations, a timer) that a
# load run cannot tell from noise. The kernel's share (sockets, wake-ups) is not counted:
# `benches/load.sh` measures the whole.
#
#   benches/instructions.sh [requests, default 300] [binary …, default target/release/tollgate]
#
# Each binary serves one key's sequential chat requests (the load script's ~1 KB body) on one
# kept-alive connection in front of tollgate's mock upstream, non-streaming then streaming,
# in a short run and a long one; every thread of the process is counted, the ledger writer's
# included. Prints instructions per request for each binary, with and without the ledger
# writer's thread.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-300}
shift || true
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/tollgate)
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

. benches/support/processes.sh

MOCK_PORT=$(free_port)
"${BINS[0]}" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT"

export TOLLGATE_ADMIN_TOKEN=bench-admin
# One gateway's run under callgrind, from start to exit: prints the instructions counted.
run() { # binary requests stream
  local port dir pid
  port=$(free_port)
  dir="$WORK/gw-$port"
  mkdir -p "$dir"
  cat >"$dir/routes.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
data_dir = "$dir/data"

[ledger]
durability = "batched"

[upstreams.mock]
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[models."gpt-4o-mini"]
upstream = "mock"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 0.15
cached_input_per_mtok = 0.075
output_per_mtok = 0.60

[router]
default = "cheap"
TOML
  TOLLGATE_LOG=warn valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$dir/callgrind.out" \
    "$1" serve --config "$dir/routes.toml" >"$dir/gw.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  wait_port "$port" 60
  python3 - "$port" "$2" "$3" <<'PY'
import http.client, json, sys
port, requests, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true"
admin = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
admin.request("POST", "/admin/keys", json.dumps({
    "name": "bench", "budget_usd": 1000000, "budget_period": "month", "rpm": 100000000, "tpm": 100000000000,
}), {"Authorization": "Bearer bench-admin", "Content-Type": "application/json"})
key = json.loads(admin.getresponse().read())["key"]
prompt = ("The quick brown fox jumps over the lazy dog. " * 22).strip()
body = json.dumps({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 16, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": prompt}]})
client = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
for _ in range(requests):
    client.request("POST", "/v1/chat/completions", body, headers)
    answer = client.getresponse()
    answer.read()
    assert answer.status == 200, answer.status
PY
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  # Every thread's count, and the ledger writer's apart: how many records it commits at once
  # follows the timing, which callgrind slows fifty-fold, so its share moves from run to run.
  python3 - "$dir" <<'PY'
import glob, re, sys
# Function names are compressed across a run's files: "(id) name" once, then "(id)".
texts = [open(path, errors="replace").read() for path in glob.glob(sys.argv[1] + "/callgrind.out*")]
names = {}
for text in texts:
    names.update(re.findall(r"^c?fn=\((\d+)\) (.+)$", text, re.M))
writer_ids = {id for id, name in names.items() if "as tollgate::meter::sink::UsageWriter>::write_batch" in name}
total = writer = 0
for text in texts:
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    count = int(found.group(1)) if found else 0
    total += count
    if writer_ids & set(re.findall(r"^fn=\((\d+)\)", text, re.M)):
        writer += count
print(total, writer)
PY
  # KEEP=dir keeps each run's profiles (one per thread) there, for callgrind_annotate.
  if [ -n "${KEEP:-}" ]; then
    for file in "$dir"/callgrind.out*; do
      cp "$file" "$KEEP/callgrind.$(basename "$1").$2.$3${file##*callgrind.out}"
    done
  fi
}

# Startup, shutdown and the first requests cost the same in a short run as in a long one: the
# difference between the two is what the extra requests cost.
SHORT=50
printf '| binary | per chat request | without the ledger writer | per streamed request | without the ledger writer |\n|---|---|---|---|---|\n'
for BIN in "${BINS[@]}"; do
  figures=()
  for stream in false true; do
    read -r short short_writer < <(run "$BIN" "$SHORT" "$stream")
    read -r long long_writer < <(run "$BIN" "$((SHORT + REQUESTS))" "$stream")
    figures+=("$(( (long - short) / REQUESTS ))")
    figures+=("$(( (long - long_writer - short + short_writer) / REQUESTS ))")
  done
  printf '| %s | %s | %s | %s | %s |\n' "$BIN" "${figures[@]}"
done
