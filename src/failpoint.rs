//! Crash points for the kill tests, and panic points for the panic tests.
//! Compiled in only with the `failpoints` feature, and armed only by
//! `GRAFT_FAILPOINT=<name>` in the environment: [`hit`] then aborts the
//! process as abruptly as a SIGKILL (no destructors, no flushes), and
//! [`panic_if`] panics the task that reaches it, as a bug would.

/// Whether the failpoint `name` is armed.
#[cfg(feature = "failpoints")]
fn armed(name: &str) -> bool {
    std::env::var("GRAFT_FAILPOINT").is_ok_and(|v| v == name)
}

/// Aborts the process when the failpoint `name` is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if armed(name) {
        eprintln!("graft: failpoint `{name}` reached; aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Panics when the failpoint `name` is armed: a stand-in for a handler bug,
/// so tests can show that a panic costs one request and nothing more.
#[inline]
pub fn panic_if(name: &str) {
    #[cfg(feature = "failpoints")]
    if armed(name) {
        panic!("failpoint `{name}` reached");
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
