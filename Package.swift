// swift-tools-version:6.0
import PackageDescription

/// clipvisor: a supervisor that keeps media decoding out of the training process.
///
/// Only `DecodeWorker` links FFmpeg; the supervisor never does, so a hang or crash in a
/// codec can only ever take down a short-lived worker.
///
/// Linux only (glibc, kernel 5.13+ for Landlock): the design rests on epoll, signalfd, pidfd,
/// memfd seals, SCM_RIGHTS and Landlock, which have no macOS equivalent, so no other platform is
/// declared or built.
let package = Package(
    name: "clipvisor",
    products: [
        .executable(name: "clipvisor", targets: ["Supervisor"]),
        .executable(name: "clipvisor-worker", targets: ["DecodeWorker"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        // Metrics: the registry and text format, and a small HTTP server for the scrape endpoint.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // 0.x: minor versions may break the API.
        .package(url: "https://github.com/swhitty/FlyingFox", .upToNextMinor(from: "0.27.1")),
    ],
    targets: [
        // C libraries, one target each, with a shim header for what does not import.
        .systemLibrary(name: "CFFmpeg", path: "Sources/CFFmpeg", pkgConfig: "libavformat"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd"),
        .systemLibrary(name: "CSystemd", path: "Sources/CSystemd", pkgConfig: "libsystemd"),
        // Linux syscalls and macros that Swift's Glibc module does not expose.
        .target(name: "CClipvisorShims", path: "Sources/CClipvisorShims"),
        // The worker's pre-initialisation: libgcrypt set up without secure memory before
        // FFmpeg's dependencies' constructors run (no "using insecure memory" in the journal).
        .target(name: "CWorkerPreinit", path: "Sources/CWorkerPreinit"),
        // Stored zstd frames (raw blocks + XXH64) written straight from the frame with pwritev.
        .target(
            name: "CStoredFrame", path: "Sources/CStoredFrame",
            cSettings: [.unsafeFlags(["-O3"])]),
        // Vectorised byte shuffles between packed and planar RGB (the worker's output layouts).
        .target(
            name: "CPixelKernels", path: "Sources/CPixelKernels",
            cSettings: [.unsafeFlags(["-O3"])]),

        .target(
            name: "Shared",
            dependencies: [
                "CZstd", "CClipvisorShims", "CStoredFrame",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Sources/Shared"
        ),
        .executableTarget(
            name: "DecodeWorker",
            dependencies: [
                "Shared", "CFFmpeg", "CClipvisorShims", "CPixelKernels", "CWorkerPreinit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Sources/DecodeWorker"
        ),
        .executableTarget(
            name: "Supervisor",
            dependencies: [
                "Shared", "CSystemd", "CClipvisorShims",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "FlyingFox", package: "FlyingFox"),
                .product(name: "FlyingSocks", package: "FlyingFox"),
            ],
            path: "Sources/Supervisor"
        ),

        .testTarget(name: "SharedTests", dependencies: ["Shared"], path: "Tests/SharedTests"),
        .testTarget(
            name: "DecodeWorkerTests",
            dependencies: ["DecodeWorker", "Shared"],
            path: "Tests/DecodeWorkerTests"
        ),
        .testTarget(
            name: "SupervisorTests",
            dependencies: ["Supervisor", "Shared"],
            path: "Tests/SupervisorTests"
        ),
    ],
    swiftLanguageModes: [.v6]
)
