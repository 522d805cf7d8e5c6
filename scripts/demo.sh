#!/usr/bin/env bash
# make demo: two memory servers on loopback, the agent pooling their memory, and a workload
# over a region 4x its resident budget; prints faults, evictions, throughput, a verified
# checksum, and where the far pages live; mid-run, memory server 1 asks for its memory back
# (donor pressure) and the agent moves its pages to server 2.
set -euo pipefail
bin="${1:-.build/release}"
work="$(mktemp -d /tmp/farpage-demo.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

head -c 32 /dev/urandom | base64 > "$work/cluster.secret"
chmod 600 "$work/cluster.secret"

wait_for_log() {  # wait_for_log FILE PATTERN
  for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  cat "$1" >&2; echo "demo: timed out waiting for '$2' in $1" >&2; exit 1
}

echo "== starting two memory servers on loopback (512 MiB each)"
ports=()
for i in 1 2; do
  "$bin/farpaged" memserver --listen 127.0.0.1:0 --capacity 512MiB --secret-file "$work/cluster.secret" \
    --admin-socket "$work/memserver$i.sock" \
    --log-level info 2> "$work/memserver$i.log" &
  pids+=($!)
  wait_for_log "$work/memserver$i.log" "fp.listen=127.0.0.1:"
  ports+=("$(sed -n 's/.*fp.listen=127.0.0.1:\([0-9]*\).*/\1/p' "$work/memserver$i.log" | head -1)")
done
echo "   listening on 127.0.0.1:${ports[0]} and 127.0.0.1:${ports[1]}"

cat > "$work/agent.toml" <<TOML
[agent]
socket = "$work/agent.sock"
resident_budget = "512MiB"
region_budget = "64MiB"
[store]
kind = "memory"
capacity = "256MiB"
[pool]
servers = ["127.0.0.1:${ports[0]}", "127.0.0.1:${ports[1]}"]
secret_file = "$work/cluster.secret"
[log]
level = "notice"
TOML

echo "== starting farpaged agent"
"$bin/farpaged" agent --config "$work/agent.toml" 2> "$work/agent.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
[ -S "$work/agent.sock" ] || { cat "$work/agent.log"; echo "agent did not start" >&2; exit 1; }

echo "== workload: 256 MiB region, 64 MiB resident budget (4x), 2 threads, 3 passes of write + verify"
"$bin/fp-workload" --socket "$work/agent.sock" --size 256MiB --budget 64MiB --threads 2 --passes 3 --name demo --hold 1 &
wl=$!
sleep 2
echo "== farpagectl regions (mid-run)"
"$bin/farpagectl" regions --socket "$work/agent.sock" || true
echo "== donor pressure (mid-run): memory server 1 wants all its memory back; the agent moves the pages"
"$bin/farpagectl" memserver reclaim 512MiB --socket "$work/memserver1.sock" --wait --timeout 60
wait $wl
echo "== farpagectl pool list (after the run: where far pages lived)"
"$bin/farpagectl" pool list --socket "$work/agent.sock"
echo "== memory server 1 lends again"
"$bin/farpagectl" memserver limit none --socket "$work/memserver1.sock"
echo "== agent status"
"$bin/farpagectl" status --socket "$work/agent.sock"
echo "== demo OK"
