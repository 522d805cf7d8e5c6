#!/usr/bin/env bash
# Benchmarks/rdma-read/run.sh BIN_DIR RDMA_ADDR [DEVICE]
#
# RDMA READ through Farpage (fp-rdma-bench: a memory server's lease read by the agent's
# queue-pair engine) next to perftest's ib_read_lat and ib_read_bw, all run in this session on
# the same device and address. Needs a real RDMA device (or Soft-RoCE) configured on RDMA_ADDR;
# where there is none it prints the reason and exits 77 (skipped).
#
# Prints one JSON line per measurement and a summary; under emulation (qemu TCG with rxe)
# compare ratios, never absolute numbers.
set -euo pipefail
bin=${1:?usage: run.sh BIN_DIR RDMA_ADDR [DEVICE]}
addr=${2:?usage: run.sh BIN_DIR RDMA_ADDR [DEVICE]}
dev=${3:-}
if ! command -v ibv_devinfo >/dev/null || ! ibv_devinfo -l 2>/dev/null | grep -q .; then
    echo "SKIP: no RDMA device here (ibv_devinfo lists none, or the kernel has no RDMA)"; exit 77
fi
[ -n "$dev" ] || dev=$(ibv_devinfo -l | sed -n '2p' | tr -d ' \t')
command -v ib_read_lat >/dev/null || { echo "SKIP: perftest is not installed (apt-get install perftest)"; exit 77; }
work=$(mktemp -d)
trap 'kill $ms 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | base64 > "$work/secret"; chmod 600 "$work/secret"

echo "== perftest ib_read_lat (4 KiB, rdma_cm) on $dev"
ib_read_lat -d "$dev" -R -s 4096 -n 2000 > "$work/lat-s.txt" 2>&1 & s=$!
sleep 1
ib_read_lat -d "$dev" -R -s 4096 -n 2000 "$addr" > "$work/lat-c.txt" 2>&1; wait $s
lat=$(awk '$1 == 4096 { print $3, $5; exit }' "$work/lat-c.txt")  # t_min, t_typical (median)
echo "== perftest ib_read_bw (64 KiB, rdma_cm)"
ib_read_bw -d "$dev" -R -s 65536 -D 2 > "$work/bw-s.txt" 2>&1 & s=$!
sleep 1
ib_read_bw -d "$dev" -R -s 65536 -D 2 "$addr" > "$work/bw-c.txt" 2>&1; wait $s
bw=$(awk '$1 == 65536 { print $4; exit }' "$work/bw-c.txt")  # BW average, MB/sec

echo "== farpaged memserver + fp-rdma-bench"
"$bin/farpaged" memserver --listen "$addr:0" --rdma-listen "$addr:0" --transport rdma --capacity 64MiB \
    --secret-file "$work/secret" --admin-socket "" --log-level info 2> "$work/ms.log" & ms=$!
for _ in $(seq 100); do grep -q "fp.listen=$addr:" "$work/ms.log" && break; sleep 0.2; done
port=$(sed -n "s/.*fp.listen=$addr:\([0-9]*\).*/\1/p" "$work/ms.log" | head -1)
[ -n "$port" ] || { cat "$work/ms.log"; echo "FAIL: the memory server did not start"; exit 1; }
"$bin/fp-rdma-bench" --server "$addr:$port" --secret-file "$work/secret" --iterations 2000 --seconds 2 | tee "$work/fp.json"
python3 - "$work/fp.json" "$lat" "$bw" <<'EOF'
import json, sys
fp = json.loads(open(sys.argv[1]).read())
lat = sys.argv[2].split(); bw = sys.argv[3]
pl = float(lat[1]) if len(lat) > 1 else float("nan")
pb = float(bw) if bw else float("nan")
print(json.dumps({"name": "perftest_read", "ib_read_lat_4k_typical_us": pl, "ib_read_bw_64k_mb_s": pb}))
print("RDMA READ 4 KiB latency: farpage p50 %.1f us, ib_read_lat typical %.1f us (ratio %.2f)" % (fp["read_4k_p50_us"], pl, fp["read_4k_p50_us"] / pl))
print("RDMA READ 64 KiB bandwidth: farpage %.0f MB/s, ib_read_bw %.0f MB/s (ratio %.2f)" % (fp["read_64k_bw_mb_s"], pb, fp["read_64k_bw_mb_s"] / pb))
EOF
