import FarpageTestSupport
import Testing

@testable import FarpageProtocol

@Suite struct WireTests {
    static let requests: [Request] = [
        .register(RegisterRequest(address: 0x7f00_0000_0000, length: 1 << 30, pageSize: 4096, residentBudget: 1 << 20,
                                  uffdFeatures: 0x1020, name: "kv-cache")),
        .unregister(regionID: 9), .advise(AdviseRequest(regionID: 3, offset: 4096, length: 8192, hint: 2)),
        .stats(regionID: 0), .statusJSON, .regionsJSON, .ping,
    ]

    @Test(arguments: requests) func requestsRoundTrip(_ request: Request) throws {
        let bytes = Wire.encode(request, requestID: 77)
        let (header, decoded) = try Wire.decodeRequest(bytes)
        #expect(decoded == request)
        #expect(header.requestID == 77)
        #expect(Int(header.length) == bytes.count)
    }

    @Test func repliesRoundTrip() throws {
        let replies: [Reply] = [
            .ok(1, 2), .error(errno: 22, code: 2, message: "length 5 is not a positive multiple"),
            .stats([1, 2, 3]), .json(text: "{\"a\": \"é\"}", more: true),
        ]
        for r in replies { #expect(try Wire.decodeReply(Wire.encode(r, requestID: 1)).1 == r) }
    }

    @Test func namesAreTruncatedToTheFieldNotOverflowed() throws {
        let long = String(repeating: "x", count: 100)
        let bytes = Wire.encode(.register(RegisterRequest(address: 4096, length: 4096, pageSize: 4096, name: long)), requestID: 1)
        #expect(bytes.count == Wire.headerSize + Wire.registerBodySize)
        guard case .register(let r) = try Wire.decodeRequest(bytes).1 else {
            Issue.record("not a register")
            return
        }
        #expect(r.name == String(repeating: "x", count: 23))
    }

    /// A seeded fuzzer: 200k random, truncated, oversized-claim and type-confused frames.
    /// Decoding must never trap, and anything accepted must re-encode to the same bytes.
    @Test func seededFuzzNeverTrapsAndAcceptsOnlyCanonicalFrames() {
        var rng = SplitMix(state: 0x5EED)
        var accepted = 0
        for i in 0..<200_000 {
            var bytes: [UInt8]
            switch i % 4 {
            case 0:  // pure garbage
                bytes = (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            case 1:  // a valid frame, truncated or extended
                bytes = Wire.encode(Self.requests[Int(rng.next() % UInt64(Self.requests.count))], requestID: 1)
                let cut = Int(rng.next() % UInt64(bytes.count + 8))
                bytes = cut < bytes.count ? Array(bytes.prefix(cut)) : bytes + [UInt8](repeating: 0xFF, count: cut - bytes.count)
            case 2:  // a valid header with a random type and a consistent length
                let type = UInt16(truncatingIfNeeded: rng.next() % 300)
                let body = (0..<Int(rng.next() % 80)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                bytes = Wire.encode(.ping, requestID: 2)
                bytes[6] = UInt8(type & 0xFF)
                bytes[7] = UInt8(type >> 8)
                bytes += body
                let n = UInt32(bytes.count)
                for k in 0..<4 { bytes[8 + k] = UInt8(truncatingIfNeeded: n >> (8 * k)) }
            default:  // bit flips in a valid frame
                bytes = Wire.encode(Self.requests[Int(rng.next() % UInt64(Self.requests.count))], requestID: 3)
                for _ in 0..<(1 + Int(rng.next() % 3)) {
                    let k = Int(rng.next() % UInt64(bytes.count))
                    bytes[k] ^= UInt8(1 << (rng.next() % 8))
                }
            }
            if let (header, request) = try? Wire.decodeRequest(bytes) {
                accepted += 1
                var again = Wire.encode(request, requestID: header.requestID)
                if case .register = request {
                    // Name bytes after the first NUL are not preserved; compare the rest.
                    again = Array(again.prefix(Wire.headerSize + 40))
                    bytes = Array(bytes.prefix(Wire.headerSize + 40))
                } else if case .advise = request {
                    again = Array(again.prefix(Wire.headerSize + 28))
                    bytes = Array(bytes.prefix(Wire.headerSize + 28))
                }
                #expect(again == bytes)
            }
            _ = try? Wire.decodeReply(bytes)
        }
        #expect(accepted > 0, "the fuzzer never produced a valid frame; it is not exercising the decoder")
    }
}
