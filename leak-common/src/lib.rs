//! Types shared by the kernel programs (`leak-ebpf`) and the agent (`leak-user`).
//!
//! Everything here crosses the user/kernel boundary, so every type is `#[repr(C)]`, uses
//! fixed-width integers with explicit padding, and has its size pinned by a `const` assertion.
//! Tags travel as `u32` and are decoded in userspace with `TryFrom`.
#![no_std]

pub mod event;
pub mod layout;
pub mod sample;
