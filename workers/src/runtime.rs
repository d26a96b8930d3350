//! The tokio runtime of the worker binaries (and of the `hyper_floor`
//! example, which must run as the worker runs to be its floor).

/// The tokio runtime: multi-threaded (one worker per CPU) as usual, but a
/// single-threaded one when the process may only use one CPU (a `taskset`
/// pinning, a one-CPU cpuset, or a cgroup CPU quota of at most one CPU such
/// as a Kubernetes limit of `1`): one worker thread plus the thread that
/// accepts would only take turns on that core, handing connections and
/// wake-ups from one to the other (about 5% more sold-out answers per CPU
/// second when measured pinned to one core).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
