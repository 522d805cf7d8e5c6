#!/bin/sh
# A guest scenario for the vm branch's harness (scripts/vm/run-guest.sh), run on Debian's 6.1
# kernel with Soft-RoCE: a memory server and an agent on real verbs (rxe0).
#  1. the memory server listens on rdma_cm, the agent reaches it over RDMA (pool list says rdma);
#  2. fp-workload writes a region 4x its resident budget and verifies it byte for byte, with
#     evictions (RDMA WRITE) and refetches (RDMA READ);
#  3. the RDMA READ benchmark next to ib_read_lat / ib_read_bw (Benchmarks/rdma-read/run.sh).
# Run: FARPAGE_BIN_DIR=$PWD/.build/debug scripts/vm/run-guest.sh Tests/VM/rdma-pool.sh
. "$FARPAGE_VM_REPO/scripts/vm/guest-lib.sh"
WORK=$(mktemp -d)
SIZE=${FARPAGE_VM_REGION:-16MiB} BUDGET=${FARPAGE_VM_BUDGET:-4MiB}
HERE=$(cd "$(dirname "$0")" && pwd)
trap 'kill $AGENT_PID $MEMSERVER_PID 2>/dev/null; wait' EXIT

step "Soft-RoCE"
softroce_up
ibv_devinfo -d rxe0 > "$FARPAGE_VM_OUT/ibv_devinfo.txt"
step "memory server (transport auto) and agent (transport rdma)"
start_memserver memserver 256MiB
grep -q "listening for RDMA connections" "$FARPAGE_VM_OUT/memserver.log" || { cat "$FARPAGE_VM_OUT/memserver.log"; fail "no rdma_cm listener"; }
POOL_EXTRA='transport = "rdma"'
start_agent
sleep 1
"$BIN/farpagectl" pool list --socket "$AGENT_SOCKET" | tee "$FARPAGE_VM_OUT/pool.txt"
"$BIN/farpagectl" pool list --json --socket "$AGENT_SOCKET" > "$FARPAGE_VM_OUT/pool.json"
[ "$(json "$FARPAGE_VM_OUT/pool.json" "[s['transport'] for s in j if s['address'] == '$RDMA_ADDR:$MEMSERVER_PORT'][0]")" = rdma ] \
  || { cat "$FARPAGE_VM_OUT/agent.log"; fail "the pool entry's transport is not rdma"; }

step "fp-workload: $SIZE with a $BUDGET budget (4x), 2 passes, byte-exact"
timeout 600 "$BIN/fp-workload" --socket "$AGENT_SOCKET" --size "$SIZE" --budget "$BUDGET" --threads 2 --json --name rdma --passes 2 \
  > "$FARPAGE_VM_OUT/rdma.json" 2> "$FARPAGE_VM_OUT/rdma.err" || { cat "$FARPAGE_VM_OUT/rdma.err" "$FARPAGE_VM_OUT/agent.log"; fail "fp-workload failed"; }
cat "$FARPAGE_VM_OUT/rdma.json"
[ "$(json "$FARPAGE_VM_OUT/rdma.json" "j['failures']")" = 0 ] || fail "pages did not verify"
for c in evictions writebacks fetches; do
  [ "$(json "$FARPAGE_VM_OUT/rdma.json" "j['$c']")" -gt 0 ] || fail "no $c: the far tier was not used"
done
"$BIN/farpagectl" pool list --json --socket "$AGENT_SOCKET" > "$FARPAGE_VM_OUT/pool-after.json"
[ "$(json "$FARPAGE_VM_OUT/pool-after.json" "[s['transport'] for s in j if s['address'] == '$RDMA_ADDR:$MEMSERVER_PORT'][0]")" = rdma ] \
  || { cat "$FARPAGE_VM_OUT/agent.log"; fail "the agent fell back to TCP during the workload"; }
grep -q "RDMA data path up" "$FARPAGE_VM_OUT/agent.log" || fail "the agent never brought RDMA up"
if grep -q "RDMA connection failed\|RDMA data path unavailable" "$FARPAGE_VM_OUT/agent.log"; then
  grep "RDMA" "$FARPAGE_VM_OUT/agent.log"; fail "RDMA errors during the workload"
fi
kill $AGENT_PID $MEMSERVER_PID; wait 2>/dev/null

if [ "${FARPAGE_VM_RDMA_BENCH:-1}" = 1 ] && [ -x "$BIN/fp-rdma-bench" ]; then
  step "RDMA READ benchmark next to perftest (emulated: ratios only)"
  "$HERE/../../Benchmarks/rdma-read/run.sh" "$BIN" "$RDMA_ADDR" rxe0 2>&1 | tee "$FARPAGE_VM_OUT/bench.txt" || true
fi
echo "PASS: memory server and agent over RDMA (rxe)"
