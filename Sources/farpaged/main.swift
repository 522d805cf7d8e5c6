import ArgumentParser
import FarpageAgent
import FarpageKernel
import FarpageMemserver
import FarpageTransport
import Foundation
import Logging
import ServiceLifecycle

@main
struct Farpaged: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpaged",
        abstract: "Farpage daemons: the paging agent and the memory server.",
        version: Agent.version,
        subcommands: [AgentCommand.self, MemserverCommand.self])
}

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the paging agent: serve page faults of registered regions and evict cold pages.")

    @Option(name: .long, help: "Configuration file (TOML). Without it, built-in defaults are used.")
    var config: String?

    @Option(name: .long, help: "Control socket path (overrides agent.socket).")
    var socket: String?

    @Option(name: .long, help: "Log level (overrides log.level): trace, debug, info, notice, warning, error, critical.")
    var logLevel: String?

    @Flag(name: .long, help: "Validate the configuration and probe the kernel, then exit.")
    var check = false

    func run() async throws {
        var cfg = AgentConfig()
        do {
            if let config { cfg = try AgentConfig.load(path: config) }
            if let socket {
                cfg.socket = socket
                try cfg.validate()
            }
        } catch {
            FileHandle.standardError.write(Data("farpaged: \(error)\n".utf8))
            throw ExitCode(78)  // EX_CONFIG
        }
        cfg.logLevel = try logLevelOption(logLevel, default: cfg.logLevel)
        let logger = bootstrapLogging(label: "farpaged.agent", level: cfg.logLevel)
        let agent: Agent
        do { agent = try Agent(config: cfg, logger: logger) } catch {
            logger.critical("cannot start: \(error)")
            FileHandle.standardError.write(Data("farpaged: \(error)\n".utf8))
            throw ExitCode(error.isConfiguration ? 78 : 69)  // EX_CONFIG or EX_UNAVAILABLE
        }
        if check {
            print("configuration OK; userfaultfd via \(agent.probe.access.rawValue); features: \(agent.probe.features.names.joined(separator: " "))")
            return
        }
        let service = AgentService(agent: agent, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        do { try await group.run() } catch {
            logger.critical("agent failed: \(error)")
            throw ExitCode(1)
        }
    }
}

struct MemserverCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memserver",
        abstract: "Lend this host's spare DRAM to agents, as leases, over TCP.")

    @Option(name: .long, help: "Configuration file (TOML).")
    var config: String?

    @Option(name: .long, help: "Address to listen on, HOST:PORT (overrides memserver.listen).")
    var listen: String?

    @Option(name: .long, help: "Memory to lend, e.g. 16GiB (overrides memserver.capacity).")
    var capacity: String?

    @Option(name: .long, help: "File holding the cluster secret (overrides memserver.secret_file).")
    var secretFile: String?

    @Option(name: .long, help: "Local admin socket for farpagectl memserver; \"\" for none (overrides memserver.admin_socket).")
    var adminSocket: String?

    @Option(name: .long, help: "Data plane: auto (RDMA too when a device exists), tcp, rdma (overrides memserver.transport).")
    var transport: String?

    @Option(name: .long, help: "rdma_cm address to listen on, HOST:PORT (overrides memserver.rdma_listen).")
    var rdmaListen: String?

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String?

    func run() async throws {
        var cfg = MemserverConfig()
        do {
            if let config { cfg = try MemserverConfig.load(path: config) }
            if let listen {
                guard let (host, port) = parseListen(listen) else {
                    throw MemserverConfigError(key: "--listen", problem: "must be HOST:PORT", fix: "e.g. --listen 0.0.0.0:7201")
                }
                (cfg.host, cfg.port) = (host, port)
            }
            if let capacity {
                guard let n = parseSize(capacity) else {
                    throw MemserverConfigError(key: "--capacity", problem: "is not a size", fix: "e.g. --capacity 16GiB")
                }
                cfg.capacityBytes = n
            }
            if let secretFile { cfg.secretFile = secretFile }
            if let transport {
                guard let t = MemserverTransport(rawValue: transport) else {
                    throw MemserverConfigError(key: "--transport", problem: "must be auto, tcp or rdma", fix: "e.g. --transport auto")
                }
                cfg.transport = t
            }
            if let rdmaListen {
                guard let (host, port) = parseListen(rdmaListen) else {
                    throw MemserverConfigError(key: "--rdma-listen", problem: "must be HOST:PORT", fix: "e.g. --rdma-listen 10.0.0.5:7202")
                }
                (cfg.rdmaHost, cfg.rdmaPort) = (host, port)
            }
            if let adminSocket {
                guard adminSocket.isEmpty || adminSocket.hasPrefix("/") else {
                    throw MemserverConfigError(key: "--admin-socket", problem: "must be an absolute path or empty",
                                               fix: "e.g. --admin-socket /run/farpage-memserver/admin.sock")
                }
                cfg.adminSocket = adminSocket
            }
            try cfg.validate()
        } catch {
            FileHandle.standardError.write(Data("farpaged: \(error)\n".utf8))
            throw ExitCode(78)
        }
        cfg.logLevel = try logLevelOption(logLevel, default: cfg.logLevel)
        let logger = bootstrapLogging(label: "farpaged.memserver", level: cfg.logLevel)
        let secret: ClusterSecret
        do { secret = try ClusterSecret.load(path: cfg.secretFile) } catch {
            FileHandle.standardError.write(Data("farpaged: \(error)\n".utf8))
            throw ExitCode(78)
        }
        let server = Memserver(config: cfg, secret: secret, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: MemserverService(server: server))], gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do { try await group.run() } catch {
            logger.critical("memserver failed: \(error)")
            throw ExitCode(1)
        }
    }
}


/// `--log-level`, or the configured level. An unknown level is a configuration error (exit 78).
func logLevelOption(_ option: String?, default level: Logger.Level) throws -> Logger.Level {
    guard let option else { return level }
    guard let parsed = Logger.Level(rawValue: option.lowercased()) else {
        FileHandle.standardError.write(
            Data("farpaged: unknown --log-level '\(option)'; use trace, debug, info, notice, warning, error or critical\n".utf8))
        throw ExitCode(78)
    }
    return parsed
}

/// Logs to standard error (journald captures it under systemd) at `level`.
func bootstrapLogging(label: String, level: Logger.Level) -> Logger {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        h.logLevel = level
        return h
    }
    return Logger(label: label)
}
