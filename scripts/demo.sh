#!/usr/bin/env bash
# make demo: start the agent on an embedded default configuration, run a workload over a
# region 4x its resident budget, print faults, evictions, throughput and a verified checksum.
set -euo pipefail
bin="${1:-.build/release}"
work="$(mktemp -d /tmp/farpage-demo.XXXXXX)"
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/agent.toml" <<TOML
[agent]
socket = "$work/agent.sock"
resident_budget = "512MiB"
region_budget = "64MiB"
[store]
kind = "memory"
capacity = "2GiB"
[log]
level = "notice"
TOML

echo "== starting farpaged agent (in-agent far store; memory servers arrive with the pool)"
"$bin/farpaged" agent --config "$work/agent.toml" 2> "$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
[ -S "$work/agent.sock" ] || { cat "$work/agent.log"; echo "agent did not start" >&2; exit 1; }

echo "== workload: 256 MiB region, 64 MiB resident budget (4x), 2 threads, 3 passes of write + verify"
"$bin/fp-workload" --socket "$work/agent.sock" --size 256MiB --budget 64MiB --threads 2 --passes 3 --name demo --hold 0.5 &
wl=$!
sleep 2
echo "== farpagectl regions (mid-run)"
"$bin/farpagectl" regions --socket "$work/agent.sock" || true
wait $wl
echo "== agent status"
"$bin/farpagectl" status --socket "$work/agent.sock"
echo "== demo OK"
