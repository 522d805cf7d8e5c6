import FarpageTestSupport
import FarpageKernel
import Testing

@testable import FarpageAgent

@Suite struct ConfigTests {
    @Test func theCommentedReferenceConfigIsValidAndMatchesTheDefaults() throws {
        let path = #filePath.components(separatedBy: "/Tests/")[0] + "/config/agent.toml"
        let c = try AgentConfig.load(path: path)
        #expect(c == AgentConfig())
    }

    @Test func sizesDurationsAndFractionsParse() throws {
        let c = try AgentConfig.parse("""
            [agent]
            resident_budget = "3GiB"
            region_budget = 1048576
            high_watermark = 0.95
            low_watermark = 0.5
            shutdown_grace = "500ms"
            [store]
            capacity = "1TiB"
            poll_us = 50
            """)
        #expect(c.residentBudget == 3 << 30)
        #expect(c.regionBudget == 1 << 20)
        #expect(c.highWatermark == 0.95 && c.lowWatermark == 0.5)
        #expect(c.shutdownGraceSeconds == 0.5)
        #expect(c.storeCapacity == 1 << 40)
        #expect(c.storePollMicroseconds == 50)
    }

    @Test(arguments: [
        ("[agent]\nresident_budget = \"lots\"", "agent.resident_budget", "4GiB"),
        ("[agent]\nhigh_watermark = 1.5", "agent.high_watermark", "fraction"),
        ("[agent]\nhigh_watermark = 0.5\nlow_watermark = 0.6", "agent.low_watermark", "below high_watermark"),
        ("[agent]\nsocket = \"relative.sock\"", "agent.socket", "absolute path"),
        ("[agent]\nsocket_mode = \"rw\"", "agent.socket_mode", "octal"),
        ("[agent]\nfault_threads = -1", "agent.fault_threads", "integer"),
        ("[agent]\nbudget = \"1GiB\"", "agent.budget", "valid keys"),
        ("[agnet]\nsocket = \"/x\"", "agnet", "unknown section"),
        ("[store]\nkind = \"nvme\"", "store.kind", "memory"),
        ("[log]\nlevel = \"loud\"", "log.level", "one of"),
        ("[tiering]\ndemote_above = 0.5\ndemote_to = 0.6", "tiering.demote_to", "below demote_above"),
        ("[tiering]\ndemote_above = 1.5", "tiering.demote_above", "fraction"),
        ("[tiering]\ndemote_after = \"soon\"", "tiering.demote_after", "30s"),
        ("[tiering]\npromote = \"yes\"", "tiering.promote", "true or false"),
        ("[store]\nlease_size = 5000", "store.lease_size", "whole number of pages"),
        ("[store]\nkind = \"file\"", "store.path", "required when kind = \"file\""),
        ("[store]\nkind = \"file\"\npath = \"spill\"", "store.path", "absolute path"),
        ("[store]\nkind = \"file\"\npath = \"/var/lib/farpage/\"", "store.path", "absolute path of a file"),
        ("[store]\nkind = \"file\"\npath = \"/var/lib/farpage/spill\"\ndirect_io = \"yes\"", "store.direct_io", "\"auto\" or \"off\""),
        ("[store]\nkind = \"nvme\"", "store.kind", "kind = \"file\""),
        ("[store]\npath = 7", "store.path", "absolute path"),
        ("[pool]\noutage_wait = \"forever\"", "pool.outage_wait", "at most 1h"),
        ("[store]\npoll_us = 5000", "store.poll_us", "0...1000"),
        ("[store]\npoll_us = \"50us\"", "store.poll_us", "integer"),
        ("[agent\nsocket = 1", "config", "not valid TOML at line"),
    ])
    func badConfigNamesTheKeyAndTheFix(_ text: String, _ key: String, _ hint: String) {
        #expect {
            try AgentConfig.parse(text)
        } throws: { error in
            guard let e = error as? ConfigError else { return false }
            return e.key == key && e.description.contains(hint)
        }
    }

    @Test func sizeParser() {
        #expect(parseSize("64MiB") == 64 << 20)
        #expect(parseSize("4096") == 4096)
        #expect(parseSize("2 GiB") == 2 << 30)
        #expect(parseSize("0") == nil)
        #expect(parseSize("-1GiB") == nil)
        #expect(parseSize("99999999999TiB") == nil)
    }
}
