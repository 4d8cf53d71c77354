extension StringProtocol {
    /// Drops leading and trailing characters in `set`: Foundation's `trimmingCharacters(in:)`
    /// without Foundation, which the worker and the supervisor's hot path leave out.
    public func trimming(_ set: String = " \t\r\n") -> String {
        let drop = Set(set)
        var slice = self[...]
        while let first = slice.first, drop.contains(first) { slice = slice.dropFirst() }
        while let last = slice.last, drop.contains(last) { slice = slice.dropLast() }
        return String(slice)
    }
}
