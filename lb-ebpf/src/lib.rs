//! The datapath, as a library so its modules can be unit-checked; `main.rs` holds the
//! program entry points.
#![no_std]
