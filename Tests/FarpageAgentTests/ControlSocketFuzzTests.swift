import FarpageKernel
import FarpageProtocol
import Foundation
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A seeded fuzzer against a live agent's control socket: random, truncated, oversized,
/// type-confused frames, some carrying descriptors. The agent must answer or close that
/// connection only, keep its memory bounded, and keep serving a real client throughout.
@Suite("Control socket fuzzing", .serialized)
struct ControlSocketFuzzTests {
    func residentKiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
    }

    @Test func aHundredThousandHostileFramesAndTheAgentKeepsServing() throws {
        let agent = try AgentProcess()
        defer { agent.stop() }
        // A real client works through the whole run.
        let client = Process()
        client.executableURL = URL(fileURLWithPath: binary("fp-workload"))
        client.arguments = ["--socket", agent.socket, "--size", "16MiB", "--budget", "2MiB", "--mode", "random",
                            "--threads", "2", "--passes", "300000", "--json"]
        let out = Pipe()
        client.standardOutput = out
        try client.run()

        let valid: [[UInt8]] = [
            Wire.encode(.ping, requestID: 1), Wire.encode(.stats(regionID: 0), requestID: 2),
            Wire.encode(.statusJSON, requestID: 3), Wire.encode(.unregister(regionID: 5), requestID: 4),
            Wire.encode(.advise(AdviseRequest(regionID: 1, offset: 0, length: 4096, hint: 3)), requestID: 5),
            Wire.encode(.register(RegisterRequest(address: 1 << 30, length: 1 << 20, pageSize: 4096)), requestID: 6),
        ]
        var rng = SplitMix(state: 0xF022)
        let memfd = try Memfd.create(name: "fuzz", size: 4096)
        let devNull = open("/dev/null", O_RDWR)
        defer { close(devNull) }
        var socket = try SeqPacketSocket.connect(path: agent.socket)
        socket.setReceiveTimeout(milliseconds: 2000)
        let rssBefore = residentKiB(agent.pid)
        var replies = 0
        var reconnects = 0
        for i in 0..<100_000 {
            var frame: [UInt8]
            switch rng.next() % 5 {
            case 0: frame = (0..<Int(rng.next() % 96)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            case 1:
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                frame = Array(frame.prefix(Int(rng.next() % UInt64(frame.count + 1))))
            case 2:  // header claims a huge length
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                let claim = UInt32(truncatingIfNeeded: rng.next())
                for k in 0..<4 { frame[8 + k] = UInt8(truncatingIfNeeded: claim >> (8 * k)) }
            case 3:  // type confusion: a valid frame with another type number
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                frame[6] = UInt8(truncatingIfNeeded: rng.next() % 140)
            default:
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                let k = Int(rng.next() % UInt64(frame.count))
                frame[k] ^= UInt8(1 << (rng.next() % 8))
            }
            if frame.isEmpty { frame = [0] }
            let fds: [Int32] = rng.next() % 10 == 0 ? [memfd.rawValue, devNull] : []
            do {
                try socket.send(frame, descriptors: fds)
                if let reply = try socket.receive(maxBytes: Wire.maxMessage), !reply.bytes.isEmpty {
                    replies += 1
                    _ = try? Wire.decodeReply(reply.bytes)
                } else {
                    throw TestSupportError("closed")
                }
            } catch {
                // The agent closed this connection (its answer to garbage): open another.
                socket = try SeqPacketSocket.connect(path: agent.socket)
                socket.setReceiveTimeout(milliseconds: 2000)
                reconnects += 1
            }
            if i % 10_000 == 0 { #expect(agent.process.isRunning, "the agent died at frame \(i)") }
        }
        #expect(agent.process.isRunning)
        #expect(replies > 50_000, "the agent answered only \(replies) frames")
        #expect(reconnects > 300, "garbage never closed a connection (\(reconnects))")
        let grown = residentKiB(agent.pid) - rssBefore
        #expect(grown < 64 * 1024, "agent memory grew by \(grown) KiB under fuzzing")
        #expect(try agent.call(.ping) == .ok(0, 0))
        client.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(client.terminationStatus == 0 && text.contains("\"failures\":0"), "the real client was disturbed: \(text)")
        #expect(try agent.status().regions == 0)
    }
}
