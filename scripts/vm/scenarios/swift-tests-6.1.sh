#!/bin/sh
# The project's Swift tests on Debian's 6.1 kernel, a few: they are slow under emulation.
# FARPAGE_VM_SWIFT_FILTER picks them (a --filter regular expression); the default covers the
# kernel facts and a memory server dying under a workload (the lost-page path).
# One test at a time: suites in parallel swamp two emulated CPUs.
. "$FARPAGE_VM_REPO/scripts/vm/guest-lib.sh"
WORK=$(mktemp -d)
filter="${FARPAGE_VM_SWIFT_FILTER:-KernelTests|aServerThatDiesIsReported}"
# The test bundle is a debug build; its agents and memory servers are the debug binaries too.
debug="$FARPAGE_VM_REPO/.build/debug"
bundle="$debug/FarpagePackageTests.xctest"
[ -x "$bundle" ] || fail "$bundle is missing: swift build --build-tests"
export FARPAGE_BIN_DIR="$debug"
[ -n "${FARPAGE_LIB:-}" ] || FARPAGE_LIB="$FARPAGE_VM_REPO/.build/release/libfarpage.so"
export FARPAGE_LIB
step "swift tests on $(uname -r): --filter '$filter'"
# Results on the console as they come (dash has no pipefail: the status goes through a file).
{ "$bundle" --testing-library swift-testing --no-parallel --filter "$filter" 2>&1; echo $? > "$WORK/rc"; } \
  | tee "$FARPAGE_VM_OUT/swift-tests.log" | sed -u 's/\x1b\[[0-9;]*m//g' | grep --line-buffered -E 'passed after|failed after|skipped|✘'
rc=$(cat "$WORK/rc")
[ $rc = 0 ] || fail "swift tests failed (status $rc): $FARPAGE_VM_OUT/swift-tests.log"
echo "PASS: swift tests on $(uname -r)"
