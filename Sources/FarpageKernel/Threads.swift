#if canImport(Glibc)
import Glibc
#endif

/// Starts a named pthread (not Swift's cooperative pool) running `body`. A joinable thread is
/// returned for `pthread_join`; with `detached`, the thread cleans up after itself.
@discardableResult
public func startThread(name: String, detached: Bool = false, _ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        let name: String
        init(_ body: @escaping @Sendable () -> Void, _ name: String) {
            self.body = body
            self.name = name
        }
    }
    let box = Unmanaged.passRetained(Box(body, name)).toOpaque()
    var thread = pthread_t()
    let r = pthread_create(&thread, nil, { arg in
        let box = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
        setCurrentThreadName(box.name)
        box.body()
        return nil
    }, box)
    precondition(r == 0, "pthread_create failed: \(r)")
    if detached { pthread_detach(thread) }
    return thread
}
