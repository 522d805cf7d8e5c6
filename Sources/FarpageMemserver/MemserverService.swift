import FarpageKernel
import Logging
import ServiceLifecycle

/// Runs a memory server inside a `ServiceGroup`: listen, expire abandoned leases, stop on SIGTERM.
public struct MemserverService: Service {
    let server: Memserver
    public init(server: Memserver) { self.server = server }

    public func run() async throws {
        try await server.start()
        var admin: AdminServer?
        if !server.config.adminSocket.isEmpty {
            do {
                admin = try AdminServer(server: server, path: server.config.adminSocket, logger: server.logger)
                admin?.start()
            } catch {
                // Lending still works; only `farpagectl memserver` cannot reach this server.
                server.logger.error("cannot open the admin socket; farpagectl memserver will not reach this server",
                                    metadata: ["fp.path": "\(server.config.adminSocket)", "fp.error": "\(error)"])
            }
        }
        server.checkPressure()
        systemdNotify("READY=1\nSTATUS=lending memory")
        // Until SIGTERM, once a second: free the leases of agents gone past their grace
        // period, and check free memory against the headroom.
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            server.expireAbandoned()
            server.checkPressure()
        }
        systemdNotify("STOPPING=1")
        admin?.stop()
        await server.stop()
    }
}
