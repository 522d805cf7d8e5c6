// swift-tools-version:6.0
import PackageDescription

// Farpage: far-memory paging for Linux. See docs/architecture.md for the module map.
let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]
let cGNU: [CSetting] = [.define("_GNU_SOURCE")]

let package = Package(
    name: "Farpage",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "farpaged", targets: ["farpaged"]),
        .executable(name: "farpagectl", targets: ["farpagectl"]),
        .executable(name: "fp-workload", targets: ["fp-workload"]),
        .executable(name: "farpage-bench", targets: ["farpage-bench"]),
        .executable(name: "fp-rdma-bench", targets: ["fp-rdma-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.70.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.0"),
    ],
    targets: [
        // Layer 1: the only code that sees kernel structs and ioctl numbers. Returns >= 0 or -errno.
        .target(name: "CFarpageKernel", cSettings: cGNU),
        // Layer 2: typed Swift wrappers (Errno, Userfaultfd, Memfd, sockets, epoll).
        .target(name: "FarpageKernel", dependencies: ["CFarpageKernel"], swiftSettings: strict),
        // Page checksums (XXH3 from Debian's libxxhash-dev, inlined).
        .target(name: "CFarpageChecksum"),
        // io_uring through liburing (Debian's liburing-dev), behind an opaque handle, and the
        // spill file's kernel calls. Returns >= 0 or -errno.
        .target(name: "CFarpageUring", cSettings: cGNU, linkerSettings: [.linkedLibrary("uring")]),
        // RDMA verbs (libibverbs) and connection management (librdmacm) behind opaque handles
        // (Debian's libibverbs-dev, librdmacm-dev). Returns >= 0 or -errno.
        .target(name: "CFarpageVerbs", cSettings: cGNU, linkerSettings: [.linkedLibrary("ibverbs"), .linkedLibrary("rdmacm")]),
        // The RDMA data path: typed verbs, a queue pair's batches with selective signalling, the
        // connection state machine (shared by memserver and agent; tested with fake verbs).
        .target(name: "FarpageRDMA", dependencies: ["CFarpageVerbs", "FarpageKernel"], swiftSettings: strict),
        // The memory-server protocol and its authentication (shared by memserver and agent).
        .target(
            name: "FarpageTransport",
            dependencies: ["CFarpageChecksum", "FarpageKernel", "FarpageProtocol", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strict),
        // The memory server: lends DRAM as leases to agents over TCP.
        .target(
            name: "FarpageMemserver",
            dependencies: [
                "FarpageTransport", "FarpageKernel", "FarpageProtocol", "CFarpageChecksum", "FarpageRDMA",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict),
        // Wire format of the agent's control socket (shared by agent, CLI, tests).
        .target(name: "FarpageProtocol", swiftSettings: strict),
        // Far tiers behind the PageStore interface.
        .target(name: "FarpageTiers", dependencies: ["FarpageKernel"], swiftSettings: strict),
        // The pool: far memory on memory servers (and a local spill: memory or a file), behind PageStore.
        .target(
            name: "FarpagePool",
            dependencies: [
                "FarpageTiers", "FarpageTransport", "FarpageProtocol", "FarpageKernel", "CFarpageChecksum", "CFarpageUring",
                "FarpageRDMA", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // The paging engine: page table, page state machine, fault service, eviction.
        .target(
            name: "FarpagePaging",
            dependencies: ["FarpageKernel", "FarpageTiers", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // The agent daemon: config, control socket, client registry, lifecycle.
        .target(
            name: "FarpageAgent",
            dependencies: [
                "FarpageKernel", "FarpagePaging", "FarpageTiers", "FarpageProtocol", "FarpagePool", "FarpageTransport",
                "FarpageRDMA", .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict),
        // The client library in plain C (also built as libfarpage.so by the Makefile).
        .target(name: "CFarpageClient", dependencies: ["CFarpageKernel"], cSettings: cGNU),
        .executableTarget(
            name: "farpaged",
            dependencies: [
                "FarpageAgent", "FarpageMemserver",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "farpagectl",
            dependencies: [
                "FarpageKernel", "FarpageProtocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "fp-workload",
            dependencies: ["CFarpageClient", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strict),
        .executableTarget(
            name: "farpage-bench",
            dependencies: [
                "CFarpageClient", "FarpageKernel",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks/farpage-bench",
            swiftSettings: strict),
        // RDMA READ latency and bandwidth through the agent's queue-pair engine, next to perftest
        // (Benchmarks/rdma-read/run.sh); needs a real RDMA device or Soft-RoCE.
        .executableTarget(
            name: "fp-rdma-bench", dependencies: ["FarpageRDMA", "FarpageTransport", "FarpageKernel"],
            path: "Benchmarks/rdma-read", exclude: ["run.sh"], swiftSettings: strict),
        // Real agent and memory-server processes for the test suites.
        .target(
            name: "FarpageTestSupport",
            dependencies: ["FarpageKernel", "FarpageProtocol", "FarpageTransport"]),
        .testTarget(name: "FarpageKernelTests", dependencies: ["FarpageKernel", "CFarpageKernel"]),
        .testTarget(name: "FarpageProtocolTests", dependencies: ["FarpageProtocol", "FarpageTransport", "FarpageTestSupport"]),
        .testTarget(
            name: "FarpageMemserverTests",
            dependencies: [
                "FarpageMemserver", "FarpageTransport", "FarpageKernel", "FarpageProtocol", "CFarpageChecksum", "FarpageTestSupport",
            ]),
        .testTarget(name: "FarpagePagingTests", dependencies: ["FarpagePaging", "FarpageTiers"]),
        .testTarget(
            name: "FarpageRDMATests",
            dependencies: [
                "FarpageRDMA", "FarpageTransport", "FarpagePool", "FarpageMemserver", "FarpageKernel", "FarpageTestSupport",
                "CFarpageChecksum", .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(
            name: "FarpageAgentTests",
            dependencies: [
                "FarpageAgent", "FarpageProtocol", "FarpageKernel", "CFarpageClient", "FarpageTestSupport", "FarpageTransport",
                "FarpagePool", "FarpageTiers", .product(name: "Logging", package: "swift-log"),
            ]),
    ]
)
