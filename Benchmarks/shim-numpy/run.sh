#!/usr/bin/env bash
# Benchmarks/shim-numpy/run.sh BIN_DIR [MIB] — the LD_PRELOAD shim's benchmark in `make bench`.
#
# The NumPy workload (Tests/Shim/numpy_workload.py: sort, cumulative sums, elementwise, matrix
# products over MIB MiB of arrays, default 1024), three ways, each three times (median):
#   local     plain python3: all memory local;
#   shim      LD_PRELOAD=libfarpage.so with an agent whose resident budget is 25% of the local
#             run's peak RSS, and two memory servers on loopback as its far tier;
#   swapfile  plain python3 in a memory cgroup limited to the same 25%, swapping to a swap
#             file on the repository's disk (Benchmarks/swap-peer/run.sh does the setup and
#             the cleanup; skipped with the reason where it cannot run).
# Every run's results digest must equal the local one (a wrong result fails the benchmark).
# Then, with the same agent, fork + exec of a program holding 4 far blocks of 64 MiB
# (Benchmarks/fork-exec), plainly and under the shim: what fork-then-exec costs.
# Prints one JSON line per run and a summary line with both ratios.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 BIN_DIR [MIB]" >&2
    exit 2
fi
bin=$(cd "$1" && pwd)
mib=${2:-1024}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
script=$repo/Tests/Shim/numpy_workload.py
lib=$bin/libfarpage.so
[[ -f $lib ]] || { echo "shim-numpy: $lib is missing (make lib)" >&2; exit 2; }

python=
for candidate in /usr/bin/python3 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import numpy" 2>/dev/null; then
        python=$(command -v "$candidate")
        break
    fi
done
if [[ -z $python ]]; then
    printf '{"name":"shim_numpy","skipped":"no python3 with NumPy (apt-get install python3-numpy)"}\n'
    exit 0
fi
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1

tmp=$(mktemp -d "${TMPDIR:-/tmp}/farpage-shim-bench.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# median of numbers on stdin
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
field() { sed -n "s/.*\"$2\": *\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1"; }

# --- local --------------------------------------------------------------------------
echo "shim-numpy: $mib MiB of arrays, local" >&2
local_secs=()
digest=
rss=0
for i in 1 2 3; do
    line=$("$python" "$script" --mib "$mib" --json shim_numpy_local 2>/dev/null)
    echo "$line"
    local_secs+=("$(field "$line" seconds)")
    digest=$(field "$line" digest)
    r=$(field "$line" maxrss_kib)
    ((r > rss)) && rss=$r
done
budget_kib=$((rss / 4))
budget="$((budget_kib / 1024))MiB"
echo "shim-numpy: peak RSS $((rss / 1024)) MiB; budget (25%) $budget" >&2

# --- under the shim, with two memory servers ------------------------------------------
head -c 32 /dev/urandom | base64 >"$tmp/cluster.secret"
chmod 600 "$tmp/cluster.secret"
servers=()
for i in 1 2; do
    "$bin/farpaged" memserver --listen 127.0.0.1:0 --capacity "$((2 * mib + 1024))MiB" \
        --secret-file "$tmp/cluster.secret" --log-level info 2>"$tmp/memserver$i.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -qs "fp.listen=127.0.0.1:" "$tmp/memserver$i.log" && break; sleep 0.1; done
    servers+=("\"127.0.0.1:$(sed -n 's/.*fp.listen=127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/memserver$i.log" | head -1)\"")
done
cat >"$tmp/agent.toml" <<EOF
[agent]
socket = "$tmp/agent.sock"
resident_budget = "$budget"
region_budget = "$budget"
max_region_size = "1TiB"
[store]
capacity = "$((mib + 512))MiB"
[pool]
servers = [$(IFS=,; echo "${servers[*]}")]
secret_file = "$tmp/cluster.secret"
[log]
level = "warning"
EOF
"$bin/farpaged" agent --config "$tmp/agent.toml" 2>"$tmp/agent.log" &
agent_pid=$!
pids+=("$agent_pid")
for _ in $(seq 100); do [[ -S $tmp/agent.sock ]] && break; sleep 0.1; done
[[ -S $tmp/agent.sock ]] || { echo "shim-numpy: the agent did not start:" >&2; cat "$tmp/agent.log" >&2; exit 1; }
echo "shim-numpy: under the shim, budget $budget, 2 memory servers" >&2
shim_secs=()
for i in 1 2 3; do
    line=$(FARPAGE_SOCKET=$tmp/agent.sock LD_PRELOAD=$lib "$python" "$script" --mib "$mib" --json shim_numpy_farpage 2>"$tmp/shim.err") || {
        echo "shim-numpy: the run under the shim failed:" >&2
        cat "$tmp/shim.err" "$tmp/agent.log" >&2
        exit 1
    }
    echo "${line%\}}, \"budget\": \"$budget\"}"
    if [[ $(field "$line" digest) != "$digest" ]]; then
        echo "shim-numpy: WRONG RESULTS under the shim (digest $(field "$line" digest), local $digest)" >&2
        exit 1
    fi
    shim_secs+=("$(field "$line" seconds)")
done
grep -qi "error" "$tmp/agent.log" && { echo "shim-numpy: agent log:" >&2; tail -n 20 "$tmp/agent.log" >&2; }

# --- fork + exec with far memory held ---------------------------------------------------
${CC:-gcc} -O2 -Wall -Wextra -o "$tmp/fork_exec" "$repo/Benchmarks/fork-exec/fork_exec.c"
fe_plain=$("$tmp/fork_exec" --regions 4 --region-mib 64 --rounds 200 --label fork_exec_plain)
echo "$fe_plain"
fe_shim=$(FARPAGE_SOCKET=$tmp/agent.sock LD_PRELOAD=$lib "$tmp/fork_exec" --regions 4 --region-mib 64 --rounds 200 \
    --label fork_exec_shim)
echo "$fe_shim"
fe_p=$(sed -n 's/.*"p50_us":\([0-9.]*\).*/\1/p' <<<"$fe_plain")
fe_s=$(sed -n 's/.*"p50_us":\([0-9.]*\).*/\1/p' <<<"$fe_shim")

# --- kernel swap under the same limit ---------------------------------------------------
echo "shim-numpy: kernel swap, cgroup limited to $budget" >&2
swap_lines=$(SWAP_PEER_MODES="swapfile swapfile swapfile" SWAP_PEER_TIMEOUT=900 \
    SWAP_PEER_COMMAND="$python $script --mib $mib --json shim_numpy_swapfile" \
    "$repo/Benchmarks/swap-peer/run.sh" "$((rss / 1024 + 512))MiB" "$budget" || true)
swap_secs=()
swap_skip=
while IFS= read -r line; do
    [[ -z $line ]] && continue
    echo "$line"
    if [[ $line == *skipped* ]]; then
        swap_skip=$(field "$line" skipped)
        continue
    fi
    if [[ $(field "$line" digest) != "$digest" ]]; then
        echo "shim-numpy: wrong results under kernel swap?! (digest $(field "$line" digest))" >&2
        exit 1
    fi
    swap_secs+=("$(field "$line" seconds)")
done <<<"$swap_lines"

l=$(printf '%s\n' "${local_secs[@]}" | median)
s=$(printf '%s\n' "${shim_secs[@]}" | median)
w=
[[ ${#swap_secs[@]} -gt 0 ]] && w=$(printf '%s\n' "${swap_secs[@]}" | median)
printf '{"name":"shim_numpy_summary","mib":%s,"budget":"%s","local_s":%s,"shim_s":%s,"swapfile_s":%s,"fork_exec_plain_us":%s,"fork_exec_shim_us":%s,"shim_vs_local":%s,"shim_vs_swapfile":%s%s}\n' \
    "$mib" "$budget" "$l" "$s" "${w:-null}" "$fe_p" "$fe_s" "$(awk -v a="$s" -v b="$l" 'BEGIN { printf "%.2f", a / b }')" \
    "$( [[ -n $w ]] && awk -v a="$s" -v b="$w" 'BEGIN { printf "%.2f", a / b }' || echo null)" \
    "$( [[ -n $swap_skip ]] && printf ',"swapfile_skipped":"%s"' "$swap_skip" || true)"
