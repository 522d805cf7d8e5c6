#!/usr/bin/env bash
# Benchmarks/memserver-overhead/run.sh BIN_DIR [STORE] [CAPACITY] — what a memory server
# costs the host that lends its memory, beyond the pages it holds.
#
# 1. starts BIN_DIR/farpaged memserver on loopback, lending CAPACITY (default 4GiB), and
#    reads its memory once it is up (nothing lent yet): memserver_idle;
# 2. starts an agent whose only far tier is that server, and BIN_DIR/fp-workload, which
#    writes a STORE-sized region (default 2GiB) under a 64 MiB resident budget, reads it
#    back, checks it, and then holds it: nearly all of it now sits in the server's leases;
# 3. reads the server's memory again and the agent's view of what it stores there
#    (`farpagectl pool list --json`: leases and stored pages), and prints memserver_overhead:
#      memory    = VmRSS + VmPTE (/proc/PID/status; page tables are memory the host loses too)
#      stored    = stored pages x 4096, and checksums = stored pages x 8 (one per page)
#      overhead  = memory - stored - checksums     (overhead_incl_checksums: memory - stored)
#      as a percentage of the bytes lent (leases x lease size; target < 1%) and of CAPACITY;
#      and split: the idle server's memory (fixed: mostly the executable's own pages) and
#      what grew beyond it while lending (overhead_beyond_idle, which scales with use).
#    smaps_rollup's Rss, Pss and Anonymous are printed alongside as a cross-check.
# Stops what it started (only those PIDs) on every exit path. JSON lines on stdout,
# progress on stderr. Exits non-zero when a step fails or the workload read back wrong.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 BIN_DIR [STORE] [CAPACITY]   (e.g. .build/release 2GiB 4GiB)" >&2
    exit 2
fi
bin=$1
store=${2:-2GiB}
capacity=${3:-4GiB}
for exe in farpaged farpagectl fp-workload; do
    if [[ ! -x $bin/$exe ]]; then
        echo "memserver-overhead: $bin/$exe is missing; build it first (swift build -c release)" >&2
        exit 2
    fi
done
bytes() {
    local s=${1%B}
    s=${s%i}
    numfmt --from=iec "$s" 2>/dev/null
}
capacity_bytes=$(bytes "$capacity") || { echo "memserver-overhead: bad CAPACITY '$capacity'" >&2; exit 2; }
store_bytes=$(bytes "$store") || { echo "memserver-overhead: bad STORE '$store'" >&2; exit 2; }
if ((store_bytes >= capacity_bytes)); then
    echo "memserver-overhead: STORE ($store) must be below CAPACITY ($capacity)" >&2
    exit 2
fi

say() { echo "memserver-overhead: $*" >&2; }
fail() {
    say "$*"
    exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/farpage-msovh.XXXXXX")
ms_pid=
agent_pid=
wl_pid=

# stop PID NAME: SIGTERM, then SIGKILL after 10 s.
stop() {
    [[ -n $1 ]] || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$1" 2>/dev/null; then
        say "$2 ($1) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
}
cleanup() {
    stop "$wl_pid" fp-workload
    stop "$agent_pid" agent
    stop "$ms_pid" memserver
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# memory PID: "rss pte anon file smaps_rss smaps_pss smaps_anon" in bytes.
memory() {
    local status rollup
    status=$(awk '/^(VmRSS|VmPTE|RssAnon|RssFile):/ { v[$1] = $2 * 1024 }
        END { printf "%.0f %.0f %.0f %.0f", v["VmRSS:"], v["VmPTE:"], v["RssAnon:"], v["RssFile:"] }' "/proc/$1/status")
    rollup=$(awk '/^(Rss|Pss|Anonymous):/ { v[$1] = $2 * 1024 }
        END { printf "%.0f %.0f %.0f", v["Rss:"], v["Pss:"], v["Anonymous:"] }' "/proc/$1/smaps_rollup" 2>/dev/null || echo "0 0 0")
    echo "$status $rollup"
}

# --- 1. an idle memory server ------------------------------------------------------
head -c 32 /dev/urandom | base64 >"$tmp/cluster.secret"
chmod 600 "$tmp/cluster.secret"
"$bin/farpaged" memserver --listen 127.0.0.1:0 --capacity "$capacity" \
    --secret-file "$tmp/cluster.secret" --log-level info 2>"$tmp/memserver.log" &
ms_pid=$!
port=
for _ in $(seq 100); do
    port=$(sed -n 's/.*fp.listen=127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/memserver.log" | head -n 1)
    [[ -n $port ]] && break
    kill -0 "$ms_pid" 2>/dev/null || { cat "$tmp/memserver.log" >&2; ms_pid=; fail "the memory server exited during startup"; }
    sleep 0.1
done
[[ -n $port ]] || { cat "$tmp/memserver.log" >&2; fail "the memory server did not report its port within 10 s"; }
server=127.0.0.1:$port
sleep 1 # let its threads and allocator settle
read -r rss pte anon file srss spss sanon <<<"$(memory "$ms_pid")"
idle_rss=$rss
idle_pte=$pte
printf '{"name":"memserver_idle","capacity_bytes":%s,"rss_bytes":%s,"pte_bytes":%s,"anon_bytes":%s,"file_bytes":%s,"smaps_rss_bytes":%s,"smaps_pss_bytes":%s,"smaps_anon_bytes":%s}\n' \
    "$capacity_bytes" "$rss" "$pte" "$anon" "$file" "$srss" "$spss" "$sanon"

# --- 2. an agent that keeps its pages there, and a workload ----------------------------
sock=$tmp/agent.sock
cat >"$tmp/agent.toml" <<EOF
[agent]
socket = "$sock"
resident_budget = "1GiB"
region_budget = "64MiB"
max_region_size = "1TiB"
[store]
kind = "memory"
capacity = "256MiB"
[pool]
servers = ["$server"]
secret_file = "$tmp/cluster.secret"
[log]
level = "warning"
EOF
"$bin/farpaged" agent --config "$tmp/agent.toml" >"$tmp/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do
    [[ -S $sock ]] && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$tmp/agent.log" >&2; agent_pid=; fail "the agent exited during startup"; }
    sleep 0.1
done
[[ -S $sock ]] || { cat "$tmp/agent.log" >&2; fail "the agent did not create $sock within 10 s"; }

# pool_field KEY: KEY of this server in `farpagectl pool list --json` (pretty-printed, one
# object per server; the local spill is listed too).
pool_field() {
    "$bin/farpagectl" pool list --socket "$sock" --json 2>/dev/null | tr -d ' \n' | sed 's/},{/}\n{/g' |
        grep -F "\"address\":\"$server\"" | sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p"
}
for _ in $(seq 100); do
    [[ $(pool_field status) == healthy ]] && break
    sleep 0.1
done
[[ $(pool_field status) == healthy ]] || { cat "$tmp/agent.log" >&2; fail "the agent did not attach $server within 10 s"; }

say "fp-workload: writing and checking $store through an agent whose far tier is $server"
# Line-buffered, so that its summary shows while it holds the region.
stdbuf -oL "$bin/fp-workload" --socket "$sock" --size "$store" --budget 64MiB --mode seq --passes 1 \
    --hold 600 --json >"$tmp/workload.json" 2>"$tmp/workload.err" &
wl_pid=$!
for _ in $(seq 3000); do
    [[ -s $tmp/workload.json ]] && break
    if ! kill -0 "$wl_pid" 2>/dev/null; then
        cat "$tmp/workload.err" >&2
        wl_pid=
        fail "fp-workload exited before it reported"
    fi
    sleep 0.1
done
[[ -s $tmp/workload.json ]] || fail "fp-workload did not finish within 300 s"
grep -q '"failures":0,' "$tmp/workload.json" || { cat "$tmp/workload.json" >&2; fail "fp-workload read back wrong pages"; }
sleep 1 # the evictor's last batches

# --- 3. what the server holds, and what it uses -----------------------------------
lease_bytes=$(pool_field lease_bytes)
leases=$(pool_field leases)
stored_pages=$(pool_field stored_pages)
[[ -n $stored_pages && $stored_pages -gt 0 ]] || fail "the agent reports no pages on $server"
read -r rss pte anon file srss spss sanon <<<"$(memory "$ms_pid")"
lent=$((leases * lease_bytes))
stored=$((stored_pages * 4096))
sums=$((stored_pages * 8))
overhead=$((rss + pte - stored - sums))
# The same without the executable's file-backed pages (shared, clean page cache the kernel can
# drop under pressure): what lending costs the host in memory it cannot get back.
overhead_anon=$((anon + pte - stored - sums))
beyond_idle=$((overhead - idle_rss - idle_pte))
pct() { awk "BEGIN { printf \"%.3f\", 100 * $1 / $2 }"; }
printf '{"name":"memserver_overhead","capacity_bytes":%s,"lease_bytes":%s,"leases":%s,"lent_bytes":%s,"stored_pages":%s,"stored_bytes":%s,"checksum_bytes":%s,"rss_bytes":%s,"pte_bytes":%s,"anon_bytes":%s,"file_bytes":%s,"smaps_rss_bytes":%s,"smaps_pss_bytes":%s,"smaps_anon_bytes":%s,"idle_rss_bytes":%s,"idle_pte_bytes":%s,"overhead_bytes":%s,"overhead_incl_checksums_bytes":%s,"overhead_pct_of_lent":%s,"overhead_pct_of_capacity":%s,"overhead_beyond_idle_bytes":%s,"overhead_beyond_idle_pct_of_lent":%s,"overhead_anon_bytes":%s,"overhead_anon_pct_of_lent":%s}\n' \
    "$capacity_bytes" "$lease_bytes" "$leases" "$lent" "$stored_pages" "$stored" "$sums" "$rss" "$pte" "$anon" "$file" \
    "$srss" "$spss" "$sanon" "$idle_rss" "$idle_pte" "$overhead" "$((overhead + sums))" \
    "$(pct "$overhead" "$lent")" "$(pct "$overhead" "$capacity_bytes")" "$beyond_idle" "$(pct "$beyond_idle" "$lent")" \
    "$overhead_anon" "$(pct "$overhead_anon" "$lent")"
