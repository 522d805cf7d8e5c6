import ArgumentParser
import FarpageAgent
import FarpageKernel
import Foundation
import Logging
import ServiceLifecycle

@main
struct Farpaged: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpaged",
        abstract: "Farpage daemons: the paging agent (and, in later releases, the memory server).",
        version: Agent.version,
        subcommands: [AgentCommand.self])
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
            throw ExitCode(69)  // EX_UNAVAILABLE
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
