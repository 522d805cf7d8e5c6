# Helpers for the guest scenarios (sourced; POSIX sh, runs under the host's /bin/sh).
# $FARPAGE_VM_OUT is the results share; artifacts written there come back to the host.

# Where the host's build put the binaries (make test-vm passes FARPAGE_BIN_DIR through).
BIN="${FARPAGE_BIN_DIR:-$FARPAGE_VM_REPO/.build/debug}"
RDMA_ADDR=10.78.0.1

step() { echo "== $*"; }
fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; echo "$*" > "$FARPAGE_VM_OUT/skipped"; exit 77; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
  limit=$1 what=$2; shift 2
  deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

# Soft-RoCE: the rxe driver on a dummy netdev; one device that talks to itself on $RDMA_ADDR.
softroce_up() {
  for m in rdma_rxe ib_uverbs rdma_ucm; do modprobe "$m" || fail "modprobe $m"; done
  ip link add dummy0 type dummy || fail "ip link add dummy0"
  ip addr add "$RDMA_ADDR/24" dev dummy0
  ip link set dummy0 up
  rdma link add rxe0 type rxe netdev dummy0 || fail "rdma link add rxe0"
  wait_for 20 "rxe0 PORT_ACTIVE" sh -c 'ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE'
}

# The transport between agent and memory server: tcp (default) or rdma (FARPAGE_VM_TRANSPORT).
TRANSPORT="${FARPAGE_VM_TRANSPORT:-tcp}"

# The network the memory server listens on: dummy0 with $RDMA_ADDR; with Soft-RoCE on top for rdma.
net_up() {
  case "$TRANSPORT" in
    tcp)
      ip link add dummy0 type dummy || fail "ip link add dummy0"
      ip addr add "$RDMA_ADDR/24" dev dummy0
      ip link set dummy0 up ;;
    rdma) softroce_up ;;
    *) fail "FARPAGE_VM_TRANSPORT=$TRANSPORT: expected tcp or rdma" ;;
  esac
}

# json FILE EXPRESSION: evaluates a Python expression over the JSON document in FILE (as j).
json() { python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# start_memserver NAME CAPACITY: starts a memory server on $RDMA_ADDR (a free port); sets
# MEMSERVER_PID and MEMSERVER_PORT. Its log is $FARPAGE_VM_OUT/NAME.log.
start_memserver() {
  log="$FARPAGE_VM_OUT/$1.log"
  [ -s "$WORK/cluster.secret" ] || { head -c 32 /dev/urandom | base64 > "$WORK/cluster.secret"; chmod 600 "$WORK/cluster.secret"; }
  # RDMA: with FARPAGE_VM_TRANSPORT=rdma the server must listen on rdma_cm (default port 7202
  # on the same address); otherwise it picks (auto: RDMA too where a device is up).
  transport_option=""
  [ "$TRANSPORT" = rdma ] && transport_option="--transport rdma"
  # shellcheck disable=SC2086 # transport_option is zero or two words
  "$BIN/farpaged" memserver --listen "$RDMA_ADDR:0" --capacity "$2" --secret-file "$WORK/cluster.secret" \
    --admin-socket "$WORK/$1.sock" --log-level info $transport_option 2> "$log" &
  MEMSERVER_PID=$!
  wait_for 60 "$1 to listen" grep -q "fp.listen=$RDMA_ADDR:" "$log"
  MEMSERVER_PORT=$(sed -n "s/.*fp.listen=$RDMA_ADDR:\([0-9]*\).*/\1/p" "$log" | head -1)
}

# start_agent: an agent whose far tier is the memory server at $MEMSERVER_PORT (and a small
# local spill); sets AGENT_PID, AGENT_SOCKET. Extra TOML lines for [pool] come from
# $POOL_EXTRA; [pool] transport is $TRANSPORT unless POOL_EXTRA names one.
start_agent() {
  AGENT_SOCKET="$WORK/agent.sock"
  case "${POOL_EXTRA:-}" in *transport*) pool_transport="" ;; *) pool_transport="transport = \"$TRANSPORT\"" ;; esac
  cat > "$WORK/agent.toml" <<TOML
[agent]
socket = "$AGENT_SOCKET"
resident_budget = "256MiB"
region_budget = "8MiB"
fault_threads = 2
# Spinning for the next fault helps on real CPUs; on emulated ones it only takes their time.
fault_spin_us = 0
[store]
kind = "memory"
capacity = "${SPILL_CAPACITY:-64MiB}"
[pool]
servers = ["$RDMA_ADDR:$MEMSERVER_PORT"]
secret_file = "$WORK/cluster.secret"
heartbeat = "${HEARTBEAT:-1s}"
io_timeout = "${IO_TIMEOUT:-2s}"
$pool_transport
${POOL_EXTRA:-}
[log]
level = "info"
TOML
  cp "$WORK/agent.toml" "$FARPAGE_VM_OUT/agent.toml"
  "$BIN/farpaged" agent --config "$WORK/agent.toml" 2> "$FARPAGE_VM_OUT/agent.log" &
  AGENT_PID=$!
  wait_for 60 "the agent's socket" test -S "$AGENT_SOCKET"
}

# monitor_agent: every 5 s, the agent's status (one JSON document a line) in
# $FARPAGE_VM_OUT/monitor.jsonl: the guest cannot be watched otherwise while it runs.
monitor_agent() {
  while sleep 5; do
    "$BIN/farpagectl" status --json --socket "$AGENT_SOCKET" >> "$FARPAGE_VM_OUT/monitor.jsonl" 2>/dev/null && echo >> "$FARPAGE_VM_OUT/monitor.jsonl"
  done
}

status_json() { "$BIN/farpagectl" status --json --socket "$AGENT_SOCKET" > "$1" || fail "farpagectl status failed"; }
