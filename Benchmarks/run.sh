#!/usr/bin/env bash
# Benchmarks/run.sh BIN_DIR — `make bench`.
#
# 1. builds and runs the raw userfaultfd floor (Benchmarks/uffd-floor) three times:
#    as the scheduler places it, client and handler on one CPU, and on two CPUs
#    (the unpinned run is bimodal; the pinned ones say which mode is which);
# 2. starts BIN_DIR/farpaged agent on a private socket with a memory store;
# 3. runs BIN_DIR/farpage-bench against it;
# 4. runs the pool benchmark: the same with two memory servers on loopback;
# 5. measures a memory server's own memory beyond the pages it holds
#    (Benchmarks/memserver-overhead/run.sh: 2 GiB stored, 4 GiB lent capacity);
# 6. runs the peer, kernel swap: a 4 GiB buffer in a memory cgroup limited to 1 GiB, with a
#    swap file and with zswap (Benchmarks/swap-peer/run.sh; rows it cannot run here, e.g.
#    without root, are printed as skipped with the reason);
# 7. runs the LD_PRELOAD shim's benchmark: NumPy over 512 MiB of arrays with a resident
#    budget of 25% of its peak RSS, next to all-local memory and kernel swap to a swap file
#    under the same limit (Benchmarks/shim-numpy/run.sh; FARPAGE_BENCH_NUMPY_MIB sets the
#    size, 0 skips it);
# 7b. where an RDMA device exists (FARPAGE_BENCH_RDMA_ADDR: its address), RDMA READ latency and
#    bandwidth through Farpage next to perftest's ib_read_lat/ib_read_bw (Benchmarks/rdma-read);
# 8. prints a summary against the targets (store-fault latency <= 1.5x the floor of the
#    same placement, agent bookkeeping <= 16 bytes/page, pool sweep >= 1.5 GB/s, memory
#    server overhead < 1% of what it lends).
#
# All JSON lines go to bench-results/latest.jsonl (relative to the current directory,
# the repository root under make). Needs userfaultfd access (root or /dev/userfaultfd).
# Exits non-zero when a step fails or a page read back wrong; missed targets are
# reported, not fatal; so is a kernel-swap row that cannot run.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 BIN_DIR   (e.g. .build/release)" >&2
    exit 2
fi
bin=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for exe in farpaged farpage-bench; do
    if [[ ! -x $bin/$exe ]]; then
        echo "run.sh: $bin/$exe is missing; build it first (swift build -c release)" >&2
        exit 2
    fi
done

results_dir=bench-results
results=$results_dir/latest.jsonl
mkdir -p "$results_dir"
: >"$results"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/farpage-bench.XXXXXX")
agent_pid=
pool_pids=()

stop_agent() {
    [[ -n $agent_pid ]] || return 0
    kill -TERM "$agent_pid" 2>/dev/null || true
    # A clean shutdown takes well under a second; don't hang the benchmark on a bad one.
    for _ in $(seq 100); do
        kill -0 "$agent_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$agent_pid" 2>/dev/null; then
        echo "run.sh: agent $agent_pid ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$agent_pid" 2>/dev/null || true
    fi
    wait "$agent_pid" 2>/dev/null || true
    agent_pid=
}

cleanup() {
    stop_agent
    local pid
    for pid in "${pool_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pool_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf '{"name":"run","kernel":"%s","cpus":%s,"started":"%s"}\n' \
    "$(uname -r)" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$results"

# --- 1. the floor -------------------------------------------------------------
${CC:-gcc} -O2 -Wall -Wextra -D_GNU_SOURCE -o "$bin/uffd_floor" "$here/uffd-floor/uffd_floor.c"
echo "== uffd floor"
"$bin/uffd_floor" | tee -a "$results"
"$bin/uffd_floor" --cpu 0 | tee -a "$results"
if [[ $(nproc) -ge 2 ]]; then
    "$bin/uffd_floor" --cpu 0,1 | tee -a "$results"
    # The agent's fault threads poll briefly before sleeping (fault_spin_us); this floor's
    # handler always polls, so it is the fair peer for the two-CPU placement.
    "$bin/uffd_floor" --spin --cpu 0,1 | tee -a "$results"
fi

# --- 2./3. the agent and the benchmark, in two placements ------------------------
# Like the floor, Farpage is measured with the client and the agent on one CPU and on
# two CPUs, and each is compared with the floor of the same placement.
sock=$tmp/agent.sock
# agent_toml STORE_KEYS...: the benchmark agent's config, with these [store] lines.
agent_toml() {
    printf '[agent]\nsocket = "%s"\nresident_budget = "2GiB"\nregion_budget = "64MiB"\nmax_region_size = "1TiB"\n' "$sock"
    printf 'high_watermark = 0.9\nlow_watermark = 0.7\n[store]\n'
    printf '%s\n' "$@"
    printf '[log]\nlevel = "warning"\n'
}
agent_toml 'kind = "memory"' 'capacity = "4GiB"' >"$tmp/agent.toml"

start_agent() {  # start_agent CPU
    taskset -c "$1" "$bin/farpaged" agent --config "$tmp/agent.toml" >"$tmp/agent.log" 2>&1 &
    agent_pid=$!
    for _ in $(seq 100); do
        [[ -S $sock ]] && return 0
        if ! kill -0 "$agent_pid" 2>/dev/null; then
            echo "run.sh: the agent exited during startup; its log:" >&2
            cat "$tmp/agent.log" >&2
            agent_pid=
            exit 1
        fi
        sleep 0.1
    done
    echo "run.sh: the agent did not create $sock within 10 s; its log:" >&2
    cat "$tmp/agent.log" >&2
    exit 1
}

bench_rc=0
placements=("same_cpu 0 0")
[[ $(nproc) -ge 2 ]] && placements+=("cross_cpu 1 0")
for placement in "${placements[@]}"; do
    read -r label agent_cpu client_cpu <<<"$placement"
    echo "== farpage-bench, $label: agent on CPU $agent_cpu, client on CPU $client_cpu"
    start_agent "$agent_cpu"
    extra=()
    # Bookkeeping once, in the last placement.
    [[ $placement == "${placements[-1]}" ]] && extra=(--agent-pid "$agent_pid")
    taskset -c "$client_cpu" "$bin/farpage-bench" --socket "$sock" --label "$label" --json-only "${extra[@]}" |
        tee -a "$results" || bench_rc=$?
    stop_agent
    if [[ -s $tmp/agent.log ]]; then
        echo "== agent log (warnings and errors)"
        tail -n 20 "$tmp/agent.log"
    fi
done

# --- 3b. the pool: two memory servers on loopback --------------------------------
# The agent and both memory servers share CPU 1, the client runs on CPU 0. The peer floor
# for a fault is the two-CPU userfaultfd floor plus one TCP round trip on one CPU (agent to
# memory server), both measured above in this run.
# The kernel's own cost of a sweep (install every page, punch as many), no network at all.
${CC:-gcc} -O2 -Wall -Wextra -o "$bin/install_floor" "$here/install-floor/install_floor.c"
echo "== install floor (UFFDIO_COPY + punch, 1 GiB, runs of 64 pages)"
taskset -c "$((($(nproc) > 1) ? 1 : 0))" "$bin/install_floor" 1024 64 | tee -a "$results"
${CC:-gcc} -O2 -Wall -Wextra -o "$bin/tcp_floor" "$here/tcp-floor/tcp_floor.c"
echo "== TCP loopback floor"
"$bin/tcp_floor" --cpu 1,1 | tee -a "$results"
if [[ $(nproc) -ge 2 ]]; then "$bin/tcp_floor" --cpu 0,1 | tee -a "$results"; fi
head -c 32 /dev/urandom | base64 >"$tmp/cluster.secret"
chmod 600 "$tmp/cluster.secret"
pool_servers=()
for i in 1 2; do
    taskset -c "$((($(nproc) > 1) ? 1 : 0))" "$bin/farpaged" memserver --listen 127.0.0.1:0 --capacity 4GiB \
        --secret-file "$tmp/cluster.secret" --log-level info 2>"$tmp/memserver$i.log" &
    pool_pids+=($!)
    for _ in $(seq 100); do grep -qs "fp.listen=127.0.0.1:" "$tmp/memserver$i.log" && break; sleep 0.1; done
    pool_servers+=("\"127.0.0.1:$(sed -n 's/.*fp.listen=127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/memserver$i.log" | head -1)\"")
done
cat >>"$tmp/agent.toml" <<EOF
[pool]
servers = [$(IFS=,; echo "${pool_servers[*]}")]
secret_file = "$tmp/cluster.secret"
EOF
echo "== farpage-bench, pool: agent and 2 memory servers on CPU $((($(nproc) > 1) ? 1 : 0)), client on CPU 0"
start_agent "$((($(nproc) > 1) ? 1 : 0))"
# The issue's shape: a 4 GiB region with a 1 GiB resident budget.
# The issue-5 rows: uniform random reads and Zipf reads after the sweep, as the swap peer.
tier_rows=(--region-pages 1048576 --budget-pages 262144 --random-reads 30000 --zipf-ops 1000000)
taskset -c 0 "$bin/farpage-bench" --socket "$sock" --label pool --json-only --evicting-faults 5000 "${tier_rows[@]}" |
    tee -a "$results" || bench_rc=$?
stop_agent
ms_rss_kib=0
for pid in "${pool_pids[@]}"; do
    ms_rss_kib=$((ms_rss_kib + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status")))
    kill -TERM "$pid" 2>/dev/null || true
done
for pid in "${pool_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pool_pids=()
printf '{"name":"memserver_memory","rss_kib_total":%s}\n' "$ms_rss_kib" | tee -a "$results"

# --- 3b'. the NVMe tier: a spill file as the only far tier --------------------------------
# The same rows with no memory server: every far page in a spill file on the repository's
# disk (bench-results/, the disk the swap peer's swap file goes to), read and written with
# io_uring and O_DIRECT. Its peer floor is what fio reads from a file on that disk.
spill_dir=$(mktemp -d "$results_dir/nvme.XXXXXX")
spill_fs=$(stat -f -c %T "$spill_dir")
case $spill_fs in
tmpfs | ramfs | overlayfs | overlay)
    printf '{"name":"sweep_nvme","skipped":"%s is on %s, not a disk; run make bench from a checkout on local storage"}\n' \
        "$results_dir" "$spill_fs" | tee -a "$results"
    ;;
*)
    if command -v fio >/dev/null; then
        echo "== disk floor: fio on $spill_fs ($results_dir), O_DIRECT, io_uring"
        # Sequential 256 KiB reads 8 deep (what a sweep can at best get) and 4 KiB random reads
        # one at a time (what a single fault can at best get), on a 1 GiB file.
        fio_json() {
            fio --name=floor --filename="$spill_dir/fio.dat" --size=1G --direct=1 --ioengine=io_uring \
                --output-format=json "$@" 2>/dev/null
        }
        seq_json=$(fio_json --rw=read --bs=256k --iodepth=8 --loops=2) || seq_json=
        # --lat_percentiles: the whole read (submission included; on a VM the submission's
        # doorbell is a VM exit of 15-20 us), which is what a fault waits for.
        rand_json=$(fio_json --rw=randread --bs=4k --iodepth=1 --runtime=5 --time_based --lat_percentiles=1) || rand_json=
        python3 - "$seq_json" "$rand_json" <<'PY' | tee -a "$results"
import json, sys
try:
    seq = json.loads(sys.argv[1])["jobs"][0]["read"]
    rnd = json.loads(sys.argv[2])["jobs"][0]["read"]
    pct = rnd["lat_ns"]["percentile"]
    print(json.dumps({"name": "disk_floor", "seq_read_gbps": round(seq["bw_bytes"] / 1e9, 3),
                      "rand4k_p50_us": round(pct["50.000000"] / 1000, 2), "rand4k_p99_us": round(pct["99.000000"] / 1000, 2)},
                     separators=(",", ":")))
except Exception as e:
    print(json.dumps({"name": "disk_floor", "skipped": "fio gave no usable result: %s" % e}, separators=(",", ":")))
PY
        rm -f "$spill_dir/fio.dat"
    else
        printf '{"name":"disk_floor","skipped":"fio is not installed (make bench installs it as root)"}\n' | tee -a "$results"
    fi
    agent_toml 'kind = "file"' "path = \"$(cd "$spill_dir" && pwd)/spill\"" 'capacity = "5GiB"' >"$tmp/agent.toml"
    echo "== farpage-bench, NVMe: agent on CPU $((($(nproc) > 1) ? 1 : 0)), client on CPU 0, spill file on $spill_fs"
    start_agent "$((($(nproc) > 1) ? 1 : 0))"
    taskset -c 0 "$bin/farpage-bench" --socket "$sock" --label nvme --json-only --evicting-faults 5000 "${tier_rows[@]}" |
        tee -a "$results" || bench_rc=$?
    stop_agent
    ;;
esac
rm -rf "$spill_dir"

# --- 3c. a memory server's own cost ---------------------------------------------------
# One server lending 4 GiB, 2 GiB of pages written into it through an agent; its memory
# beyond the pages (and their checksums) is the overhead.
echo "== memory server overhead: 2 GiB stored, 4 GiB capacity"
"$here/memserver-overhead/run.sh" "$bin" 2GiB 4GiB | tee -a "$results" || bench_rc=$?

# --- 3d. the peer: kernel swap under the same memory limit ----------------------------
# What a user gets without Farpage: the buffer in a memory cgroup limited to the resident
# budget, the rest swapped (to a swap file on the repository's disk, then with zswap).
${CC:-gcc} -O2 -Wall -Wextra -o "$bin/swap_peer" "$here/swap-peer/swap_peer.c" -lm
echo "== kernel swap peer: 4 GiB buffer, memory cgroup limited to 1 GiB"
SWAP_PEER=$bin/swap_peer "$here/swap-peer/run.sh" 4GiB 1GiB | tee -a "$results" ||
    echo "run.sh: the swap peer failed (exit $?); its rows are missing" >&2

# --- 3e. the shim: NumPy under LD_PRELOAD, next to local memory and kernel swap --------
numpy_mib=${FARPAGE_BENCH_NUMPY_MIB:-512}
if [[ $numpy_mib != 0 ]]; then
    echo "== LD_PRELOAD shim: NumPy over $numpy_mib MiB, budget 25% of its peak RSS"
    "$here/shim-numpy/run.sh" "$bin" "$numpy_mib" | tee -a "$results" || bench_rc=$?
fi

# --- 3f. RDMA READ next to perftest, where this host has an RDMA device ---------------
# Benchmarks/rdma-read/run.sh needs the device's IP address (FARPAGE_BENCH_RDMA_ADDR); a
# host without a device (or without kernel RDMA) gets a skipped line.
if command -v ibv_devinfo >/dev/null && ibv_devinfo -l 2>/dev/null | sed -n '2,$p' | grep -q '[^[:space:]]'; then
    if [[ -n ${FARPAGE_BENCH_RDMA_ADDR:-} ]]; then
        echo "== RDMA READ: fp-rdma-bench next to ib_read_lat / ib_read_bw on $FARPAGE_BENCH_RDMA_ADDR"
        rc=0
        "$here/rdma-read/run.sh" "$bin" "$FARPAGE_BENCH_RDMA_ADDR" | tee -a "$results" || rc=$?
        [[ $rc == 0 || $rc == 77 ]] || bench_rc=$rc
    else
        printf '{"name":"rdma_read","skipped":"an RDMA device is here; set FARPAGE_BENCH_RDMA_ADDR to its IP address to measure it"}\n' |
            tee -a "$results"
    fi
else
    printf '{"name":"rdma_read","skipped":"no RDMA device here (ibv_devinfo lists none, or the kernel has no RDMA)"}\n' | tee -a "$results"
fi

# --- 4. summary ---------------------------------------------------------------
# field NAME KEY: the number KEY of the JSON line whose name is NAME, or empty.
field() {
    { grep -F "\"name\":\"$1\"" "$results" || true; } | tail -n 1 |
        sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9.eE+-]*\).*/\1/p"
}
# first_field NAME KEY: the same from the first such line. The kernel-swap rows: the shim's
# NumPy benchmark runs the swap peer again later, with lines of the same names.
first_field() {
    { grep -F "\"name\":\"$1\"" "$results" || true; } | head -n 1 |
        sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9.eE+-]*\).*/\1/p"
}
# calc EXPR: awk arithmetic on numbers that may be empty (then prints n/a).
calc() { awk "BEGIN { ${1} }" 2>/dev/null || echo "n/a"; }
ratio() { [[ -n $1 && -n $2 ]] && calc "if ($2 > 0) printf \"%.2f\", $1 / $2; else print \"n/a\"" || echo "n/a"; }
# verdict VALUE LIMIT: "met" when VALUE <= LIMIT.
verdict() {
    [[ -n $1 && $1 != n/a ]] || { echo "n/a"; return; }
    calc "print (($1 <= $2) ? \"met\" : \"NOT met\")"
}
show() { [[ -n $1 ]] && echo "$1" || echo "n/a"; }

floor_p50=$(field uffd_floor p50_us)
floor_p99=$(field uffd_floor p99_us)
same_p50=$(field uffd_floor_same_cpu p50_us)
same_p99=$(field uffd_floor_same_cpu p99_us)
cross_p50=$(field uffd_floor_cross_cpu p50_us)
cross_p99=$(field uffd_floor_cross_cpu p99_us)
spin_p50=$(field uffd_floor_spin_cross_cpu p50_us)
spin_p99=$(field uffd_floor_spin_cross_cpu p99_us)
fp_p50=$(field store_fault_same_cpu p50_us)
fp_p99=$(field store_fault_same_cpu p99_us)
ev_p50=$(field store_fault_evicting_same_cpu p50_us)
ev_p99=$(field store_fault_evicting_same_cpu p99_us)
xfp_p50=$(field store_fault_cross_cpu p50_us)
xfp_p99=$(field store_fault_cross_cpu p99_us)
xev_p50=$(field store_fault_evicting_cross_cpu p50_us)
xev_p99=$(field store_fault_evicting_cross_cpu p99_us)
# Each placement is judged against the floor of the same placement.
r50=$(ratio "$fp_p50" "$same_p50")
r99=$(ratio "$fp_p99" "$same_p99")
cr50=$(ratio "$xfp_p50" "$spin_p50")
cr99=$(ratio "$xfp_p99" "$spin_p99")
sweep=$(field sweep_same_cpu gbps)
xsweep=$(field sweep_cross_cpu gbps)
tcp_same=$(field tcp_floor_same_cpu rtt_p50_us)
tcp_bulk=$(field tcp_floor_cross_cpu bulk_gbps)
pool_p50=$(field store_fault_pool p50_us)
pool_p99=$(field store_fault_pool p99_us)
pool_sweep=$(field sweep_pool gbps)
pool_peer=$([[ -n $cross_p50 && -n $tcp_same ]] && calc "printf \"%.2f\", $cross_p50 + $tcp_same" || echo "")
pool_ratio=$(ratio "$pool_p50" "$pool_peer")
ms_idle=$(field memserver_idle rss_bytes)
ms_overhead=$(field memserver_overhead overhead_bytes)
ms_overhead_sums=$(field memserver_overhead overhead_incl_checksums_bytes)
ms_stored=$(field memserver_overhead stored_bytes)
ms_lent=$(field memserver_overhead lent_bytes)
ms_pct=$(field memserver_overhead overhead_pct_of_lent)
ms_anon=$(field memserver_overhead overhead_anon_bytes)
ms_anon_pct=$(field memserver_overhead overhead_anon_pct_of_lent)
install_us=$(field install_floor install_us_per_page)
punch_us=$(field install_floor punch_us_per_page)
sweep_floor=$(field install_floor sweep_floor_gbps)
mib() { [[ -n $1 ]] && calc "printf \"%.1f\", $1 / 1048576" || echo "n/a"; }
# swap_skip MODE: why the kernel-swap row MODE was skipped, or empty.
swap_skip() {
    { grep -F "\"name\":\"swap_peer_$1\"" "$results" || true; } | head -n 1 |
        sed -n 's/.*"skipped":"\([^"]*\)".*/\1/p'
}
swap_sweep=$(first_field swap_peer_swapfile sweep_gbps)
zswap_sweep=$(first_field swap_peer_zswap sweep_gbps)
swap_p50=$(first_field swap_peer_swapfile rand_p50_us)
swap_p99=$(first_field swap_peer_swapfile rand_p99_us)
zswap_p50=$(first_field swap_peer_zswap rand_p50_us)
zswap_p99=$(first_field swap_peer_zswap rand_p99_us)
bpp_sparse=$(field bookkeeping_cross_cpu bytes_per_page_sparse)
bpp_touched=$(field bookkeeping_cross_cpu bytes_per_page_touched)
[[ -n $bpp_sparse ]] || bpp_sparse=$(field bookkeeping_same_cpu bytes_per_page_sparse)
[[ -n $bpp_touched ]] || bpp_touched=$(field bookkeeping_same_cpu bytes_per_page_touched)

row() { printf '  %-46s %12s %12s\n' "$1" "$2" "$3"; }
echo
echo "== summary (results in $results)"
row "" "p50 us" "p99 us"
row "uffd floor, scheduler's placement (bimodal)" "$(show "$floor_p50")" "$(show "$floor_p99")"
row "uffd floor, client and handler on one CPU" "$(show "$same_p50")" "$(show "$same_p99")"
row "uffd floor, client and handler on two CPUs" "$(show "$cross_p50")" "$(show "$cross_p99")"
row "uffd floor, two CPUs, handler polling" "$(show "$spin_p50")" "$(show "$spin_p99")"
row "farpage store fault, one CPU" "$(show "$fp_p50")" "$(show "$fp_p99")"
row "farpage store fault, one CPU, eviction running" "$(show "$ev_p50")" "$(show "$ev_p99")"
row "farpage store fault, two CPUs" "$(show "$xfp_p50")" "$(show "$xfp_p99")"
row "farpage store fault, two CPUs, eviction running" "$(show "$xev_p50")" "$(show "$xev_p99")"
row "ratio farpage / floor, one CPU (target <= 1.5)" "$r50" "$r99"
row "  target" "$(verdict "$r50" 1.5)" "$(verdict "$r99" 1.5)"
row "ratio farpage / polling floor, two CPUs (target <= 1.5)" "$cr50" "$cr99"
row "  target" "$(verdict "$cr50" 1.5)" "$(verdict "$cr99" 1.5)"
echo
row "sweep read GB/s, one CPU / two CPUs" "$(show "$sweep")" "$(show "$xsweep")"
echo
row "TCP loopback round trip (4 KiB reply), one CPU" "$(show "$tcp_same")" ""
row "pool store fault (2 memory servers)" "$(show "$pool_p50")" "$(show "$pool_p99")"
row "  peer: uffd floor two CPUs + TCP round trip" "$(show "$pool_peer")" ""
row "  ratio (target <= 1.5)" "$pool_ratio" "$(verdict "$pool_ratio" 1.5)"
row "pool sweep read GB/s (target >= 1.5)" "$(show "$pool_sweep")" "$(calc "print (($(show "$pool_sweep") >= 1.5) ? \"met\" : \"NOT met\")")"
row "  kernel floor: UFFDIO_COPY + punch, us/page" "$(show "$install_us")" "$(show "$punch_us")"
row "  sweep those alone allow, GB/s; pool / floor" "$(show "$sweep_floor")" "$(ratio "$pool_sweep" "$sweep_floor")"
row "TCP bulk one stream GB/s" "$(show "$tcp_bulk")" ""
row "agent bytes/page, sparse (target <= 16)" "$(show "$bpp_sparse")" "$(verdict "$bpp_sparse" 16)"
row "agent bytes/page, touched (target <= 16)" "$(show "$bpp_touched")" "$(verdict "$bpp_touched" 16)"
echo
row "memory server RSS, idle, MiB" "$(mib "$ms_idle")" ""
row "memory server, $(mib "$ms_stored") MiB stored in $(mib "$ms_lent") MiB lent:" "" ""
row "  overhead MiB, without / with checksums" "$(mib "$ms_overhead")" "$(mib "$ms_overhead_sums")"
row "  overhead % of lent, all resident memory" "$(show "$ms_pct")" "$(verdict "$ms_pct" 1)"
row "  overhead MiB / % of lent, anonymous (target < 1)" "$(mib "$ms_anon")" "$(show "$ms_anon_pct")"
row "    target" "$(verdict "$ms_anon_pct" 1)" ""
echo
row "kernel swap, 4 GiB in a 1 GiB cgroup" "swapfile" "zswap"
row "  sweep read GB/s" "$(show "$swap_sweep")" "$(show "$zswap_sweep")"
row "  random 4 KiB read p50 us" "$(show "$swap_p50")" "$(show "$zswap_p50")"
row "  random 4 KiB read p99 us" "$(show "$swap_p99")" "$(show "$zswap_p99")"
row "  pool sweep / kernel swap sweep" "$(ratio "$pool_sweep" "$swap_sweep")" "$(ratio "$pool_sweep" "$zswap_sweep")"
for mode in swapfile zswap; do
    reason=$(swap_skip "$mode")
    [[ -z $reason ]] || echo "  kernel swap, $mode: skipped: $reason"
done

# The issue-5 rows: a 4 GiB region at a 1 GiB budget on each far tier, next to kernel swap
# (the better of swap file and zswap: "beats swap" must hold against both).
echo
row4() { printf '  %-34s %10s %10s %10s %10s\n' "$1" "$2" "$3" "$4" "$5"; }
# beats KIND VALUE PEER: "yes"/"NO" when VALUE is better than PEER, n/a when either is missing.
beats() {
    [[ -n $2 && -n $3 ]] || { echo "n/a"; return; }
    if [[ $1 == higher ]]; then calc "print ($2 > $3) ? \"yes\" : \"NO\""; else calc "print ($2 < $3) ? \"yes\" : \"NO\""; fi
}
swap_zipf=$(first_field swap_peer_swapfile zipf_ops_per_s)
zswap_zipf=$(first_field swap_peer_zswap zipf_ops_per_s)
nvme_sweep=$(field sweep_nvme gbps)
disk_seq=$(field disk_floor seq_read_gbps)
echo "== 4 GiB region, 1 GiB resident budget: Farpage's far tiers next to kernel swap (same limit)"
row4 "" "pool" "NVMe" "swapfile" "zswap"
row4 "sweep read GB/s" "$(show "$pool_sweep")" "$(show "$nvme_sweep")" "$(show "$swap_sweep")" "$(show "$zswap_sweep")"
for m in p50 p99; do
    row4 "random 4 KiB read $m us" "$(show "$(field random_pool rand_${m}_us)")" "$(show "$(field random_nvme rand_${m}_us)")" \
        "$(show "$(first_field swap_peer_swapfile rand_${m}_us)")" "$(show "$(first_field swap_peer_zswap rand_${m}_us)")"
done
row4 "Zipf 0.99 reads/s" "$(show "$(field zipf_pool ops_per_s)")" "$(show "$(field zipf_nvme ops_per_s)")" \
    "$(show "$swap_zipf")" "$(show "$zswap_zipf")"
row4 "  Zipf hit ratio (resident)" "$(show "$(field zipf_pool hit_ratio)")" "$(show "$(field zipf_nvme hit_ratio)")" "" ""
row4 "beats kernel swap? (tier vs peer)" "pool/file" "pool/zswap" "NVMe/file" "NVMe/zswap"
# verdicts KIND POOL NVME FILE ZSWAP: the four comparisons of one row.
verdicts() {
    echo "$(beats "$1" "$2" "$4")" "$(beats "$1" "$2" "$5")" "$(beats "$1" "$3" "$4")" "$(beats "$1" "$3" "$5")"
}
read -r -a v <<<"$(verdicts higher "$pool_sweep" "$nvme_sweep" "$swap_sweep" "$zswap_sweep")"
row4 "  sweep" "${v[@]}"
for m in p50 p99; do
    read -r -a v <<<"$(verdicts lower "$(field random_pool rand_${m}_us)" "$(field random_nvme rand_${m}_us)" \
        "$(first_field swap_peer_swapfile rand_${m}_us)" "$(first_field swap_peer_zswap rand_${m}_us)")"
    row4 "  random $m" "${v[@]}"
done
read -r -a v <<<"$(verdicts higher "$(field zipf_pool ops_per_s)" "$(field zipf_nvme ops_per_s)" "$swap_zipf" "$zswap_zipf")"
row4 "  Zipf" "${v[@]}"
row4 "transport raw GB/s (TCP bulk; fio)" "$(show "$tcp_bulk")" "$(show "$disk_seq")" "" ""
row4 "  sweep / raw (target >= 0.5)" "$(ratio "$pool_sweep" "$tcp_bulk")" "$(ratio "$nvme_sweep" "$disk_seq")" "" ""
row4 "  disk 4 KiB read QD1 p50 / p99 us" "$(show "$(field disk_floor rand4k_p50_us)")" "$(show "$(field disk_floor rand4k_p99_us)")" "" ""

np_local=$(field shim_numpy_summary local_s)
np_shim=$(field shim_numpy_summary shim_s)
np_swap=$(field shim_numpy_summary swapfile_s)
echo
row "NumPy under the shim, 25% budget: seconds" "" ""
row "  all local / under the shim" "$(show "$np_local")" "$(show "$np_shim")"
row "  kernel swap (swap file), same limit" "$(show "$np_swap")" ""
row "  shim / local, shim / swap file" "$(ratio "$np_shim" "$np_local")" "$(ratio "$np_shim" "$np_swap")"
fe_plain=$(field shim_numpy_summary fork_exec_plain_us)
fe_shim=$(field shim_numpy_summary fork_exec_shim_us)
row "fork+exec holding 4 x 64 MiB, us: plain / shim" "$(show "$fe_plain")" "$(show "$fe_shim")"
row "  shim / plain" "$(ratio "$fe_shim" "$fe_plain")" ""

if [[ $bench_rc -ne 0 ]]; then
    echo "run.sh: a benchmark failed (exit $bench_rc); see the messages above" >&2
    exit "$bench_rc"
fi
