#!/bin/sh
# Smoke test of the harness itself: the guest runs 6.1 and the results share is writable.
set -e
uname -r | grep -q '^6\.1\.' || { echo "expected a 6.1 kernel, got $(uname -r)"; exit 1; }
echo hello > "$FARPAGE_VM_OUT/hello"
