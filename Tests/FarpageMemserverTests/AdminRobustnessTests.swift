import FarpageKernel
import FarpageMemserver
import FarpageProtocol
import FarpageTestSupport
import FarpageTransport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Regressions found in review of the admin socket; each test failed before its fix.
@Suite("Memory server: admin robustness (regressions)", .serialized)
struct AdminRobustnessTests {
    /// `reclaim` rounds `bytes` up to leases with `bytes + lease_size - 1`: a value within one
    /// lease of UInt64.max overflows and traps, and the whole server (every agent's pages)
    /// goes with it. `farpagectl memserver reclaim 18446744073709551615` sends exactly that.
    @Test func aHugeReclaimDoesNotCrashTheServer() throws {
        let server = try MemserverProcess(capacity: "16MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let reply = try? server.admin(.init(op: .reclaim, bytes: UInt64.max))
        usleep(200_000)
        #expect(server.process.isRunning, "the memory server died: \(server.logText.suffix(400))")
        #expect(reply?.ok == true)
    }

    /// 64 admin clients that connect and never send (a hung farpagectl, a monitoring probe that
    /// stalls) hold every slot forever: there is no idle timeout, and every later operator
    /// request is refused until they go away.
    @Test func idleAdminClientsDoNotLockTheOperatorOut() throws {
        let server = try MemserverProcess(capacity: "16MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let idle = try (0..<64).map { _ in try SeqPacketSocket.connect(path: server.adminSocket) }
        defer { _ = idle.count }
        usleep(200_000)
        let reply = try server.admin(.init(op: .status))
        #expect(reply.ok, "operator locked out: \(reply.error ?? "")")
        withExtendedLifetime(idle) {}
    }
}
