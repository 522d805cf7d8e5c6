#!/bin/sh
# The agent on Debian's 6.1 kernel, whose userfaultfd lacks WP_UNPOPULATED, POISON, WP_ASYNC
# and MOVE (features 0x1fff; 6.18 reports 0x1ffff). The agent must detect it and adapt:
#  1. farpaged agent --check and farpagectl status show the features, and the lost-page
#     fallback (SIGBUS to the faulting thread instead of UFFDIO_POISON), logged once.
#  2. A memory server dies (SIGKILL) under a workload: the pages only it held are lost; the
#     client must die of SIGBUS, never read zeros or wrong bytes, never hang.
#  3. Afterwards a new workload over the same agent (now spilling locally) verifies.
. "$FARPAGE_VM_REPO/scripts/vm/guest-lib.sh"
WORK=$(mktemp -d)
SIZE=${FARPAGE_VM_REGION:-8MiB} BUDGET=${FARPAGE_VM_BUDGET:-2MiB}
trap 'kill $MONITOR_PID $AGENT_PID $MEMSERVER_PID 2>/dev/null; wait' EXIT

step "1. what the kernel offers, and what the agent makes of it"
"$BIN/farpaged" agent --check | tee "$FARPAGE_VM_OUT/check.txt" || fail "farpaged agent --check failed on $(uname -r)"
features=$(sed -n 's/.*features: //p' "$FARPAGE_VM_OUT/check.txt")
for f in missing_shmem wp_hugetlbfs_shmem thread_id; do
  case " $features " in *" $f "*) ;; *) fail "the kernel should offer $f: $features" ;; esac
done
absent=""
for f in wp_unpopulated poison wp_async move; do
  case " $features " in *" $f "*) ;; *) absent="$absent $f" ;; esac
done
echo "absent on $(uname -r):$absent"
case "$absent" in *poison*) ;; *) skip "this kernel has UFFDIO_POISON: the fallback is not exercised here" ;; esac

net_up
start_memserver memserver 256MiB
start_agent
monitor_agent &
MONITOR_PID=$!
status_json "$FARPAGE_VM_OUT/status-start.json"
signal=$(json "$FARPAGE_VM_OUT/status-start.json" "j['lost_page_signal']")
[ "$signal" = sigbus_to_faulting_thread ] || fail "status says lost_page_signal=$signal, expected sigbus_to_faulting_thread"
[ "$(json "$FARPAGE_VM_OUT/status-start.json" "'poison' in j['uffd_features']")" = False ] || fail "status lists poison"
[ "$(grep -c 'no UFFDIO_POISON' "$FARPAGE_VM_OUT/agent.log")" = 1 ] || fail "the fallback was not logged exactly once at start"
"$BIN/farpagectl" status --socket "$AGENT_SOCKET" | grep '^lost pages *sigbus_to_faulting_thread' || fail "farpagectl status does not show the fallback"

step "2. the memory server dies under a workload: its pages are lost, the client gets SIGBUS"
SWIFT_BACKTRACE=enable=no timeout 300 "$BIN/fp-workload" --socket "$AGENT_SOCKET" --size "$SIZE" --budget "$BUDGET" --threads 2 --passes 50 --name victim \
  > "$FARPAGE_VM_OUT/victim.out" 2>&1 &
victim=$!
wait_for 300 "pages on the memory server" sh -c "'$BIN/farpagectl' pool list --json --socket '$AGENT_SOCKET' | python3 -c 'import json,sys; sys.exit(sum(s[\"stored_pages\"] for s in json.load(sys.stdin) if s[\"address\"] == \"$RDMA_ADDR:$MEMSERVER_PORT\") < 500)'"
kill -KILL $MEMSERVER_PID
wait $victim; rc=$?
cat "$FARPAGE_VM_OUT/victim.out"
[ $rc = 124 ] && fail "the client hung on a lost page (no SIGBUS within 300 s)"
[ $rc = $((128 + 7)) ] || fail "the client should die of SIGBUS (status 135), got status $rc"
grep -q MISMATCH "$FARPAGE_VM_OUT/victim.out" && fail "a lost page was served with wrong contents"
grep -q 'poisoning it' "$FARPAGE_VM_OUT/agent.log" || fail "the agent did not report a lost page"
grep -q 'poisoning a lost page failed' "$FARPAGE_VM_OUT/agent.log" && fail "the fallback failed: $(grep 'poisoning a lost page failed' "$FARPAGE_VM_OUT/agent.log" | head -1)"
status_json "$FARPAGE_VM_OUT/status-lost.json"
lost=$(json "$FARPAGE_VM_OUT/status-lost.json" "j['totals']['lost_pages']")
[ "$lost" -gt 0 ] || fail "lost_pages is $lost"
echo "lost pages: $lost; the client died of SIGBUS"

step "3. a new workload over the same agent verifies (the dead server's place taken by the local spill)"
timeout 300 "$BIN/fp-workload" --socket "$AGENT_SOCKET" --size "$SIZE" --budget "$BUDGET" --threads 2 --passes 2 --json --name after \
  > "$FARPAGE_VM_OUT/after.json" 2>&1 || { cat "$FARPAGE_VM_OUT/after.json"; fail "the workload after the loss failed"; }
cat "$FARPAGE_VM_OUT/after.json"
[ "$(json "$FARPAGE_VM_OUT/after.json" "j['failures']")" = 0 ] || fail "pages did not verify after the loss"
[ "$(json "$FARPAGE_VM_OUT/after.json" "j['fetches']")" -gt 0 ] || fail "no refetches after the loss"
echo "PASS: the agent on $(uname -r) detects the missing userfaultfd features and falls back"
