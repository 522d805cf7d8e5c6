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
