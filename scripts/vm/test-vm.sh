#!/usr/bin/env bash
# make test-vm: each scenario in its own boot of Debian's 6.1 kernel, with its own timeout,
# pass/fail and log (.build/vm/out/<scenario>/console.log and the files beside it).
#   scripts/vm/test-vm.sh [SCENARIO[:TRANSPORT]...]   a name in scripts/vm/scenarios, or a path
#   to a script; ":rdma" or ":tcp" sets FARPAGE_VM_TRANSPORT for that boot (its output goes to
#   .build/vm/out/<scenario>-<transport>)
#   (default: softroce farpage-far-tier farpage-far-tier:rdma farpage-kernel-6.1 swift-tests-6.1)
# Environment: FARPAGE_VM_TRANSPORT=tcp|rdma (agent <-> memory server), FARPAGE_BIN_DIR (the
# binaries, default .build/debug), FARPAGE_VM_TIMEOUT (seconds per boot, default 600).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export FARPAGE_BIN_DIR="${FARPAGE_BIN_DIR:-$repo/.build/debug}"
for b in farpaged farpagectl fp-workload; do
  [ -x "$FARPAGE_BIN_DIR/$b" ] || { echo "test-vm: $FARPAGE_BIN_DIR/$b is missing: run swift build first (make test-vm does)" >&2; exit 3; }
done
if [ $# -gt 0 ]; then scenarios=("$@"); else
  scenarios=(softroce farpage-far-tier farpage-far-tier:rdma farpage-kernel-6.1 swift-tests-6.1)
fi
timeout_s="${FARPAGE_VM_TIMEOUT:-600}"
results=() failed=0 start=$(date +%s)
default_transport="${FARPAGE_VM_TRANSPORT:-tcp}"
labels=()
for name in "${scenarios[@]}"; do
  export FARPAGE_VM_TRANSPORT="$default_transport" suffix=""
  case "$name" in
    *:tcp | *:rdma) FARPAGE_VM_TRANSPORT="${name##*:}"; suffix="-${name##*:}"; name="${name%:*}" ;;
  esac
  case "$name" in
    */*) script="$(realpath "$name")"; name="$(basename "$name")" ;;  # a scenario elsewhere, e.g. Tests/VM/
    *) script="$here/scenarios/${name%.sh}.sh" ;;
  esac
  [ -x "$script" ] || { echo "test-vm: no scenario $script" >&2; exit 3; }
  out="$repo/.build/vm/out/${name%.sh}$suffix"
  labels+=("${name%.sh}$suffix")
  echo "==== VM: ${name%.sh} (Linux $(basename "$(ls /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -1)" | sed 's/vmlinuz-//'), transport ${FARPAGE_VM_TRANSPORT:-tcp}, timeout ${timeout_s}s)"
  "$here/run-guest.sh" --timeout "$timeout_s" --out "$out" "$script"
  rc=$?
  wall=$(cat "$out/wall_seconds" 2>/dev/null || echo "?")
  case $rc in
    0) verdict=PASS; [ -s "$out/xfail" ] && verdict="PASS, $(wc -l < "$out/xfail") XFAIL (known gaps)" ;;
    77) verdict="SKIP ($(cat "$out/skipped" 2>/dev/null))" ;;
    3) verdict="ERROR (host setup)"; failed=1 ;;
    124) verdict="FAIL (timed out)"; failed=1 ;;
    *) verdict="FAIL (status $rc)"; failed=1 ;;
  esac
  if [ "$verdict" != PASS ] && [ "${verdict#SKIP}" = "$verdict" ]; then
    echo "---- last lines of $out/console.log"; tail -25 "$out/console.log" 2>/dev/null
  fi
  results+=("$(printf '%-22s %-40s %6ss  %s' "${name%.sh}$suffix" "$verdict" "$wall" "$out/console.log")")
done
echo "==== VM tests ($(( $(date +%s) - start )) s)"
printf '%s\n' "${results[@]}"
for label in "${labels[@]}"; do
  [ -s "$repo/.build/vm/out/$label/xfail" ] && sed "s/^/known gap ($label): /" "$repo/.build/vm/out/$label/xfail"
  [ -s "$repo/.build/vm/out/$label/notes" ] && sed "s/^/note ($label): /" "$repo/.build/vm/out/$label/notes"
done
exit $failed
