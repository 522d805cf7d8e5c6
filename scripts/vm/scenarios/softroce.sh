#!/bin/sh
# Soft-RoCE comes up on Debian's 6.1 kernel and real verbs work: ibv_devinfo shows rxe0
# active; rping (rdma_cm connection, RDMA READ/WRITE/SEND) and ib_read_lat (RDMA READ)
# complete between a client and a server on the one rxe device. Function only: under
# emulation an RDMA READ takes ~26 us, so no speed is asserted.
. "$FARPAGE_VM_REPO/scripts/vm/guest-lib.sh"

step "Soft-RoCE up"
softroce_up
ibv_devinfo -d rxe0 | tee "$FARPAGE_VM_OUT/ibv_devinfo.txt"
grep -q 'state:.*PORT_ACTIVE' "$FARPAGE_VM_OUT/ibv_devinfo.txt" || fail "rxe0 is not PORT_ACTIVE"
grep -q 'transport:.*InfiniBand' "$FARPAGE_VM_OUT/ibv_devinfo.txt" || fail "rxe0 does not report IB transport"
rdma link show | grep -q 'rxe0/1 state ACTIVE' || fail "rdma link show: rxe0 not ACTIVE"

step "rping: 5 round trips over rdma_cm"
timeout 60 rping -s -a "$RDMA_ADDR" -C 5 > "$FARPAGE_VM_OUT/rping-server.txt" 2>&1 &
server=$!
sleep 1
timeout 60 rping -c -a "$RDMA_ADDR" -C 5 -v > "$FARPAGE_VM_OUT/rping-client.txt" 2>&1 || { cat "$FARPAGE_VM_OUT"/rping-*.txt; fail "rping client failed"; }
wait $server || { cat "$FARPAGE_VM_OUT"/rping-*.txt; fail "rping server failed"; }
pings=$(grep -c 'ping data' "$FARPAGE_VM_OUT/rping-client.txt")
[ "$pings" = 5 ] || fail "rping client printed $pings ping lines, expected 5"

step "ib_read_lat: 200 RDMA READs of 4 KiB (connection by rdma_cm)"
timeout 90 ib_read_lat -d rxe0 -R -s 4096 -n 200 > "$FARPAGE_VM_OUT/ib_read_lat-server.txt" 2>&1 &
server=$!
sleep 1
timeout 90 ib_read_lat -d rxe0 -R -s 4096 -n 200 "$RDMA_ADDR" > "$FARPAGE_VM_OUT/ib_read_lat-client.txt" 2>&1 || {
  cat "$FARPAGE_VM_OUT"/ib_read_lat-*.txt; fail "ib_read_lat client failed"; }
wait $server || { cat "$FARPAGE_VM_OUT"/ib_read_lat-*.txt; fail "ib_read_lat server failed"; }
cat "$FARPAGE_VM_OUT/ib_read_lat-client.txt"
# The result row: bytes, iterations, then latencies in microseconds.
awk '$1 == 4096 && $2 == 200 { found = 1 } END { exit !found }' "$FARPAGE_VM_OUT/ib_read_lat-client.txt" \
  || fail "ib_read_lat printed no result row for 4096 bytes x 200"
echo "PASS: Soft-RoCE verbs"
