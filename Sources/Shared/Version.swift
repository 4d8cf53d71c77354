/// The version both executables report; a supervisor refuses a worker of another version.
/// The one place it is written: the Python wheels (clients/python/setup.py) and the Debian
/// package (scripts/package.sh) take it from here.
public enum ClipvisorVersion {
    public static let string = "0.1.0"
    /// The client protocol version (docs/protocol.md).
    public static let clientProtocol = 1
    /// The worker protocol version (docs/worker-protocol.md). 2: the decode result travels
    /// only in the block's header, no longer also in `done`.
    public static let workerProtocol = 2
}
