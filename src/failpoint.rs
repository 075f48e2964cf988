//! Crash points for the kill tests. Compiled in only with the `failpoints`
//! feature, and armed only by `GRAFT_FAILPOINT=<name>` in the environment:
//! the process then aborts at that point as abruptly as a SIGKILL (no
//! destructors, no flushes).

/// Aborts the process when the failpoint `name` is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("GRAFT_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("graft: failpoint `{name}` reached; aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
