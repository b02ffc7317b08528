//! Ctrl-C and SIGTERM for long-running tasks (demo, benchmark): a flag checked between
//! steps, so that the task unwinds and its guards remove the namespaces, agents and pins
//! it made instead of the process dying with them in place.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into the flag.
pub fn catch() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Whether a signal arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// An error saying what happens now (`doing`), once a signal arrived.
pub fn check(doing: &str) -> Result<()> {
    if interrupted() {
        bail!("interrupted: {doing}");
    }
    Ok(())
}
