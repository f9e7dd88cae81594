# Sourced by the bench scripts: a scratch directory and the processes they start, both gone
# when the script exits however it ends, and loopback ports.
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port port [seconds, default 5]: a server under valgrind takes longer to start.
wait_port() {
  local tries=$(( ${2:-5} * 20 ))
  for _ in $(seq "$tries"); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; exit 1
}
