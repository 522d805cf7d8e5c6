import FarpageKernel
import Logging
import ServiceLifecycle

/// Runs a memory server inside a `ServiceGroup`: listen, expire abandoned leases, stop on SIGTERM.
public struct MemserverService: Service {
    let server: Memserver
    public init(server: Memserver) { self.server = server }

    public func run() async throws {
        try await server.start()
        systemdNotify("READY=1\nSTATUS=lending memory")
        // Until SIGTERM: once a second, free the leases of agents gone past their grace period.
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            server.expireAbandoned()
        }
        systemdNotify("STOPPING=1")
        await server.stop()
    }
}
