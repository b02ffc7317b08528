//! Counting decisions per reason; the agent sums the per-CPU values for /metrics.
use lb_common::metric_index;

use crate::maps::METRICS;

/// Adds one to the counter of `reason` in direction `dir`.
#[inline(always)]
pub fn count(reason: u32, dir: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(metric_index(reason, dir)) {
        // SAFETY: per-CPU slot, only this CPU writes it, and preemption is off while a
        // BPF program runs.
        unsafe { *counter += 1 };
    }
}
