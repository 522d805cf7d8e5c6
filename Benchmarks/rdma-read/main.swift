// fp-rdma-bench: RDMA READ latency and bandwidth through Farpage's own data path (the
// agent's queue-pair engine, `RDMAChannel`), against a running `farpaged memserver`, to be read
// next to perftest's ib_read_lat / ib_read_bw from the same session (Benchmarks/rdma-read/run.sh).
//
//   fp-rdma-bench --server HOST:PORT --secret-file FILE [--iterations N] [--seconds S]
//
// Prints one JSON line. Exits 77 (skipped) with the reason when this host has no RDMA device
// or the server offers no RDMA.
import FarpageKernel
import FarpageRDMA
import FarpageTransport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

func fail(_ message: String, code: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data("fp-rdma-bench: \(message)\n".utf8))
    exit(code)
}

var server = ""
var secretFile = ""
var iterations = 2000
var seconds = 2.0
var depth = 32
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--server": server = args.popFirst() ?? ""
    case "--secret-file": secretFile = args.popFirst() ?? ""
    case "--iterations": iterations = Int(args.popFirst() ?? "") ?? iterations
    case "--seconds": seconds = Double(args.popFirst() ?? "") ?? seconds
    case "--depth": depth = Int(args.popFirst() ?? "") ?? depth
    default: fail("unknown argument \(a)", code: 2)
    }
}
guard let colon = server.lastIndex(of: ":"), let port = Int(server[server.index(after: colon)...]), !secretFile.isEmpty else {
    fail("usage: fp-rdma-bench --server HOST:PORT --secret-file FILE [--iterations N] [--seconds S] [--depth N]", code: 2)
}
let host = String(server[..<colon])
let verbs = SystemVerbs()
if let reason = verbs.probe().reason { fail("skipped: \(reason)", code: 77) }

do {
    let secret = try ClusterSecret.load(path: secretFile)
    let client = try MemserverClient(host: host, port: port, agentID: ClusterSecret.randomBytes(16), name: "fp-rdma-bench", secret: secret)
    guard case .leases(let ids) = try client.call(.leaseAlloc(count: 1)), let lease = ids.first else { fail("no lease") }
    let endpoint: RDMAEndpoint
    do {
        guard case .rdmaEndpoint(let e) = try client.call(.rdmaConnect) else { fail("bad RDMA_ENDPOINT") }
        endpoint = e
    } catch { fail("skipped: the memory server offers no RDMA: \(error)", code: 77) }
    let qp = try verbs.connect(host: endpoint.host.isEmpty ? host : endpoint.host, port: Int(endpoint.port),
                               privateData: MemWire.rdmaPrivateData(token: endpoint.token), stagingBytes: 4 << 20, sendDepth: depth,
                               timeoutMilliseconds: 5000)
    guard case .keys(let keys) = try client.call(.leaseKeys([lease])), let key = keys.first else { fail("bad KEYS") }
    let channel = RDMAChannel(queuePair: qp, signalInterval: 16, spinMicroseconds: 1_000_000, timeoutMilliseconds: 5000)
    // Fill the lease so reads move real pages.
    memset(channel.staging, 0x5A, 1 << 20)
    try channel.run([RemoteAccess(opcode: .write, localOffset: 0, length: 1 << 20, remoteAddress: key.address, rkey: key.rkey)])

    // Latency: one 4 KiB READ at a time (what a fault waits for), busy-polled.
    var samples: [Double] = []
    samples.reserveCapacity(iterations)
    let pages = Int(min(key.length, 1 << 20)) / 4096
    for i in 0..<(iterations + 100) {
        let t0 = monotonicNanoseconds()
        try channel.run([RemoteAccess(opcode: .read, localOffset: 0, length: 4096, remoteAddress: key.address + UInt64((i % pages) * 4096), rkey: key.rkey)])
        if i >= 100 { samples.append(Double(monotonicNanoseconds() - t0) / 1000) }
    }
    samples.sort()
    func pct(_ p: Double) -> Double { samples[min(samples.count - 1, Int(Double(samples.count) * p))] }

    // Bandwidth: 64 KiB READs, `depth` in flight, for `seconds`.
    let chunk = 64 << 10
    let perBatch = (4 << 20) / chunk
    let batch = (0..<perBatch).map {
        RemoteAccess(opcode: .read, localOffset: $0 * chunk, length: chunk, remoteAddress: key.address + UInt64(($0 * chunk) % Int(min(key.length, 16 << 20))), rkey: key.rkey)
    }
    var bytes = 0
    let start = monotonicNanoseconds()
    while Double(monotonicNanoseconds() - start) / 1e9 < seconds {
        try channel.run(batch)
        bytes += perBatch * chunk
    }
    let elapsed = Double(monotonicNanoseconds() - start) / 1e9
    let c = channel.counters
    print(#"{"name":"rdma_read","device":"\#(qp.device)","read_4k_p50_us":\#(pct(0.5)),"read_4k_p99_us":\#(pct(0.99)),"read_4k_min_us":\#(samples.first ?? 0),"iterations":\#(iterations),"read_64k_bw_mb_s":\#(Double(bytes) / elapsed / 1e6),"depth":\#(depth),"signaled":\#(c.signaled),"posted":\#(c.posted),"sleeps":\#(c.sleeps)}"#)
    channel.close()
    _ = try? client.call(.leaseFree(leaseID: lease))
    client.close()
} catch {
    fail("\(error)")
}
