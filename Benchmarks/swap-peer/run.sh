#!/usr/bin/env bash
# Benchmarks/swap-peer/run.sh [SIZE] [LIMIT] — the kernel-swap peer of `make bench`.
#
# Runs swap_peer (a SIZE buffer, default 4GiB: fill, sequential sweep, random 4 KiB reads)
# in a memory cgroup limited to LIMIT (default 1GiB), twice:
#   swapfile  swap to a swap file on the filesystem of the repository, zswap off;
#   zswap     the same swap file with zswap (compressed cache in RAM) in front of it.
# Prints one JSON line per row on stdout, either a result or
#   {"name":"swap_peer_MODE","mode":"MODE","skipped":"REASON"}
# when the row cannot run here (not root, no memory cgroup, swapon refused, no zswap...).
# Progress and reasons also go to stderr. Exits 0 unless its arguments are wrong: the
# benchmark must not fail because a host has no swap.
#
# Needs root: it enables swap and zswap system-wide for the duration (our swap file
# gets the highest priority, so swapping goes to it) and restores everything on every
# exit path, Ctrl-C included: the peer is killed, the cgroup removed, the swap file
# turned off and deleted, zswap's `enabled` set back.
#
# Environment:
#   SWAP_PEER        a built swap_peer (default: built into a temporary directory)
#   SWAP_PEER_DIR    where the swap file goes (default: bench-results/ of the repository)
#   SWAP_PEER_READS  random reads timed (default 30000)
#   SWAP_PEER_ZIPF_OPS  Zipf reads timed for throughput (default 1000000; 0 skips them)
#   SWAP_PEER_FILL   page contents: half (default), random or sparse (see swap_peer.c)
#   SWAP_PEER_TIMEOUT  seconds one row may take before it is killed (default 300)
#   SWAP_PEER_COMMAND  a shell command run in the cgroup instead of swap_peer; it must print
#                      one JSON object on stdout (used for the shim's NumPy benchmark), and
#                      sees the row's mode in $SWAP_PEER_MODE
#   SWAP_PEER_MODES    the rows to run (default "swapfile zswap")
set -euo pipefail

if [[ $# -gt 2 || ${1:-} == -* ]]; then
    echo "usage: $0 [SIZE] [LIMIT]   (e.g. 4GiB 1GiB)" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

# bytes SIZE: "4GiB", "4G", "512MiB", "1073741824" -> bytes (powers of 1024).
bytes() {
    local s=${1%B}
    s=${s%i}
    numfmt --from=iec "$s" 2>/dev/null
}
size_arg=${1:-4GiB}
limit_arg=${2:-1GiB}
size=$(bytes "$size_arg") || { echo "$0: bad SIZE '$size_arg'" >&2; exit 2; }
limit=$(bytes "$limit_arg") || { echo "$0: bad LIMIT '$limit_arg'" >&2; exit 2; }
if ((limit >= size)); then
    echo "$0: LIMIT ($limit_arg) must be below SIZE ($size_arg), or nothing is swapped" >&2
    exit 2
fi
reads=${SWAP_PEER_READS:-30000}
zipf_ops=${SWAP_PEER_ZIPF_OPS:-1000000}
fill=${SWAP_PEER_FILL:-half}
row_timeout=${SWAP_PEER_TIMEOUT:-300}
read -r -a modes <<<"${SWAP_PEER_MODES:-swapfile zswap}"

say() { echo "swap-peer: $*" >&2; }
# skip MODE REASON: the JSON line for a row that cannot run (the reason made JSON-safe).
skip() {
    local reason
    # shellcheck disable=SC1003 # newline, tab, quote and backslash become space, space, ', '
    reason=$(printf '%s' "$2" | tr '\n\t"\\' "  ''" | tr -s ' ')
    printf '{"name":"swap_peer_%s","mode":"%s","skipped":"%s"}\n' "$1" "$1" "$reason"
    say "$1: skipped: $reason"
}
skip_all() {
    local m
    for m in "${modes[@]}"; do skip "$m" "$1"; done
    exit 0
}

# --- state to undo, and the undoing ------------------------------------------------
tmp=
swapfile=
swap_on=
cgroup=
peer_pid=
zswap_param=/sys/module/zswap/parameters/enabled
zswap_before=

cleanup() {
    local rc=$?
    if [[ -n $peer_pid ]]; then
        kill -TERM "$peer_pid" 2>/dev/null || true
        wait "$peer_pid" 2>/dev/null || true
        peer_pid=
    fi
    if [[ -n $cgroup ]]; then
        # The last task leaves the cgroup a moment after it was reaped.
        for _ in $(seq 50); do rmdir "$cgroup" 2>/dev/null && break; sleep 0.1; done
        [[ -d $cgroup ]] && say "WARNING: could not remove the cgroup $cgroup; remove it with: rmdir $cgroup"
        cgroup=
    fi
    if [[ -n $zswap_before ]]; then
        echo "$zswap_before" >"$zswap_param" 2>/dev/null || say "WARNING: could not set $zswap_param back to $zswap_before"
        zswap_before=
    fi
    if [[ -n $swap_on ]]; then
        if swapoff "$swapfile"; then
            swap_on=
        else
            say "WARNING: swapoff $swapfile failed; the swap file is left in place: run swapoff $swapfile && rm -r $tmp"
            tmp=
        fi
    fi
    [[ -n $tmp ]] && rm -rf "$tmp"
    return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- what this host allows ---------------------------------------------------------
[[ $(id -u) -eq 0 ]] || skip_all "needs root (swapon, memory cgroups)"
for cmd in mkswap swapon swapoff fallocate numfmt timeout; do
    command -v "$cmd" >/dev/null || skip_all "$cmd is not installed"
done

# The memory cgroup this script runs in, and the kind (v1 memory controller or v2).
cgroup_kind=
cgroup_parent=
v1_mount=$(awk '$9 == "cgroup" && $NF ~ /(^|,)memory(,|$)/ { print $5; exit }' /proc/self/mountinfo)
if [[ -n $v1_mount ]]; then
    path=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3; exit }' /proc/self/cgroup)
    for candidate in "$v1_mount$path" "$v1_mount"; do
        [[ -f $candidate/memory.limit_in_bytes ]] && { cgroup_kind=v1; cgroup_parent=$candidate; break; }
    done
fi
if [[ -z $cgroup_kind ]]; then
    # cgroup v2: the child needs a parent with memory in cgroup.subtree_control. Our own
    # cgroup usually holds processes and so cannot enable it (no internal processes); the
    # root of the hierarchy can, and systemd enables memory there.
    v2_mount=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
    path=$(awk -F: '$1 == "0" { print $3; exit }' /proc/self/cgroup)
    if [[ -n $v2_mount ]]; then
        for candidate in "$v2_mount$path" "$v2_mount"; do
            if grep -qsw memory "$candidate/cgroup.subtree_control"; then
                cgroup_kind=v2
                cgroup_parent=$candidate
                break
            fi
        done
    fi
fi
[[ -n $cgroup_kind ]] || skip_all "no memory cgroup to create a child in (no cgroup v1 memory controller, no cgroup2 with memory in cgroup.subtree_control)"

# The swap file: on the repository's filesystem (tmpfs cannot hold swap), sized for
# the whole buffer (the part beyond the limit, and room to spare).
dir=${SWAP_PEER_DIR:-$repo/bench-results}
mkdir -p "$dir"
fstype=$(stat -f -c %T "$dir")
case $fstype in
tmpfs | ramfs | overlayfs | overlay) skip_all "$dir is on $fstype, which cannot hold a swap file (set SWAP_PEER_DIR)" ;;
esac
avail=$(($(stat -f -c '%a * %S' "$dir")))
((avail > size + (1 << 30))) || skip_all "$dir has $((avail >> 20)) MiB free; the swap file needs $((size >> 20)) MiB and 1 GiB spare"

# --- set up -----------------------------------------------------------------------
peer=${SWAP_PEER:-}
tmp=$(mktemp -d "$dir/swap-peer.XXXXXX")
if [[ -z $peer && -z ${SWAP_PEER_COMMAND:-} ]]; then
    peer=$tmp/swap_peer
    ${CC:-gcc} -O2 -Wall -Wextra -o "$peer" "$here/swap_peer.c" -lm
fi

swapfile=$tmp/swapfile
if ! out=$(fallocate -l "$size" "$swapfile" 2>&1 && chmod 600 "$swapfile" && mkswap "$swapfile" 2>&1); then
    skip_all "could not make a $((size >> 20)) MiB swap file on $fstype: $out"
fi
# Highest priority: while it has room, the kernel swaps only to it, whatever else is on.
if ! out=$(swapon --priority 32767 "$swapfile" 2>&1); then
    skip_all "swapon $swapfile ($fstype) refused: $out"
fi
swap_on=1
say "swap file $swapfile ($((size >> 20)) MiB on $fstype) is on; other swap: $(($(wc -l </proc/swaps) - 2)) areas"

cgroup=$cgroup_parent/farpage-swap-peer.$$
mkdir "$cgroup" 2>/dev/null || { cgroup=; skip_all "cannot create a cgroup under $cgroup_parent"; }
if [[ $cgroup_kind == v1 ]]; then
    echo "$limit" >"$cgroup/memory.limit_in_bytes" 2>/dev/null ||
        skip_all "cannot set memory.limit_in_bytes in $cgroup"
    # Swap must not be limited (memory+swap unlimited is the default; set it in case).
    if [[ -f $cgroup/memory.memsw.limit_in_bytes ]]; then
        echo -1 >"$cgroup/memory.memsw.limit_in_bytes" 2>/dev/null || true
    fi
else
    echo "$limit" >"$cgroup/memory.max" 2>/dev/null || skip_all "cannot set memory.max in $cgroup"
    if [[ -f $cgroup/memory.swap.max ]]; then echo max >"$cgroup/memory.swap.max" 2>/dev/null || true; fi
fi
say "cgroup $cgroup ($cgroup_kind) limited to $((limit >> 20)) MiB"

# run_row MODE: one swap_peer run in the cgroup; its JSON line, with the limit added.
run_row() {
    local out=$tmp/$1.json err=$tmp/$1.err rc=0
    # The shell moves itself into the cgroup, then becomes the peer: nothing else is charged.
    if [[ -n ${SWAP_PEER_COMMAND:-} ]]; then
        SWAP_PEER_MODE=$1 sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cgroup" \
            timeout "$row_timeout" sh -c "$SWAP_PEER_COMMAND" >"$out" 2>"$err" &
    else
        sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cgroup" \
            timeout "$row_timeout" "$peer" --size "$size" --reads "$reads" --zipf-ops "$zipf_ops" --fill "$fill" --mode "$1" >"$out" 2>"$err" &
    fi
    peer_pid=$!
    wait "$peer_pid" || rc=$?
    peer_pid=
    cat "$err" >&2
    if [[ $rc -eq 0 && -s $out ]]; then
        sed "s/}\$/,\"limit_bytes\":$limit,\"cgroup\":\"$cgroup_kind\"}/" "$out"
    elif [[ $rc -eq 124 ]]; then
        skip "$1" "took longer than ${row_timeout}s (SWAP_PEER_TIMEOUT)"
    elif [[ $rc -eq 137 ]]; then
        skip "$1" "killed (SIGKILL: the cgroup's OOM killer?) $(tail -n 1 "$err")"
    else
        skip "$1" "swap_peer failed with exit $rc: $(tail -n 1 "$err")"
    fi
}

# --- the rows ---------------------------------------------------------------------
zswap_now=$(cat "$zswap_param" 2>/dev/null || true)
for mode in "${modes[@]}"; do
    case $mode in
    swapfile)
        if [[ $zswap_now == Y ]]; then
            zswap_before=Y
            echo N >"$zswap_param" 2>/dev/null || { skip swapfile "zswap is on and cannot be turned off"; continue; }
        fi
        ;;
    zswap)
        if [[ -z $zswap_now ]]; then
            skip zswap "this kernel has no zswap ($zswap_param is missing)"
            continue
        fi
        [[ -n $zswap_before ]] || zswap_before=$zswap_now
        if ! echo Y >"$zswap_param" 2>/dev/null || [[ $(cat "$zswap_param") != Y ]]; then
            skip zswap "zswap cannot be enabled here (writing Y to $zswap_param failed)"
            continue
        fi
        say "zswap on (compressor $(cat /sys/module/zswap/parameters/compressor 2>/dev/null || echo '?'))"
        ;;
    esac
    say "$mode: $((size >> 20)) MiB buffer, $((limit >> 20)) MiB limit, $reads random reads, fill $fill"
    run_row "$mode"
done
