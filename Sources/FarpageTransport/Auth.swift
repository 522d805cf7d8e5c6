import Crypto
import Foundation

/// Mutual challenge–response over a cluster secret (HMAC-SHA256 from swift-crypto).
///
/// The agent proves it knows the secret by MACing both nonces and its id; the server
/// proves the same back with a different label, so neither side can be replayed or
/// impersonated by a peer that only saw earlier exchanges.
public struct ClusterSecret: Sendable {
    private let secret: [UInt8]
    private var key: SymmetricKey { SymmetricKey(data: secret) }

    /// At least 16 bytes; surrounding whitespace (a trailing newline in a file) is ignored.
    public init(_ bytes: [UInt8]) throws(SecretError) {
        guard bytes.count >= 16 else { throw SecretError("the cluster secret must be at least 16 bytes (got \(bytes.count))") }
        secret = bytes
    }

    /// Reads the secret from a file that only its owner may read.
    public static func load(path: String) throws(SecretError) -> ClusterSecret {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SecretError("cannot read the cluster secret file \(path); create it with `head -c 32 /dev/urandom | base64 > \(path)` and chmod 0600")
        }
        if let attributes = try? FileManager.default.attributesOfItem(atPath: path),
            let mode = attributes[.posixPermissions] as? Int, mode & 0o077 != 0
        {
            throw SecretError("the cluster secret file \(path) is readable by others (mode \(String(mode, radix: 8))); chmod 0600 it")
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return try ClusterSecret(Array(text.utf8))
    }

    public func agentProof(serverNonce: [UInt8], clientNonce: [UInt8], agentID: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Self.message("FPM1-agent", serverNonce, clientNonce, agentID), using: key))
    }

    public func serverProof(serverNonce: [UInt8], clientNonce: [UInt8], agentID: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Self.message("FPM1-server", clientNonce, serverNonce, agentID), using: key))
    }

    /// Checks an agent's proof in constant time (swift-crypto's comparison).
    public func verifyAgentProof(_ mac: [UInt8], serverNonce: [UInt8], clientNonce: [UInt8], agentID: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(
            mac, authenticating: Self.message("FPM1-agent", serverNonce, clientNonce, agentID), using: key)
    }

    /// Checks a server's proof in constant time.
    public func verifyServerProof(_ mac: [UInt8], serverNonce: [UInt8], clientNonce: [UInt8], agentID: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(
            mac, authenticating: Self.message("FPM1-server", clientNonce, serverNonce, agentID), using: key)
    }

    private static func message(_ label: String, _ parts: [UInt8]...) -> [UInt8] {
        Array(label.utf8) + parts.flatMap { $0 }
    }

    /// Random bytes from the system CSPRNG.
    public static func randomBytes(_ n: Int) -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<n).map { _ in UInt8.random(in: 0...255, using: &g) }
    }
}

public struct SecretError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ d: String) { description = d }
}
