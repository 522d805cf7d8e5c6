import Foundation
import Logging
import ServiceLifecycle

/// Runs the agent inside a `ServiceGroup`: starts it, waits for SIGTERM/SIGINT, then drains.
public struct AgentService: Service {
    let agent: Agent
    let logger: Logger

    public init(agent: Agent, logger: Logger) {
        self.agent = agent
        self.logger = logger
    }

    public func run() async throws {
        try agent.start()
        try? await gracefulShutdown()
        agent.beginShutdown()
        // Keep serving faults while clients finish and free their regions.
        let deadline = Date().addingTimeInterval(agent.config.shutdownGraceSeconds)
        while agent.regionCount > 0, Date() < deadline {
            try? await Task.sleep(for: .milliseconds(100))
        }
        agent.stop()
    }
}
