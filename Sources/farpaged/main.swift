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
        if let logLevel {
            guard let level = Logger.Level(rawValue: logLevel.lowercased()) else {
                throw ValidationError("unknown log level '\(logLevel)'")
            }
            cfg.logLevel = level
        }
        let level = cfg.logLevel
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "farpaged.agent")
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
            try cfg.validate()
        } catch {
            FileHandle.standardError.write(Data("farpaged: \(error)\n".utf8))
            throw ExitCode(78)
        }
        if let logLevel {
            guard let level = Logger.Level(rawValue: logLevel.lowercased()) else {
                FileHandle.standardError.write(Data("farpaged: unknown --log-level '\(logLevel)'; use trace, debug, info, notice, warning, error or critical\n".utf8))
                throw ExitCode(78)
            }
            cfg.logLevel = level
        }
        let level = cfg.logLevel
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "farpaged.memserver")
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

