//! Kernel programs of `leak`: the OOM hooks and the reads of kernel memory they need.
#![no_std]
#![no_main]
// `core::sync::atomic` offers no read-modify-write on BPF (the target has no compare-and-swap
// before v3), so shared counters use the intrinsic, which lowers to BPF_ATOMIC_ADD (XADD).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod charge;
mod crosscheck;
mod kernel;
mod maps;
mod oom;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: no panic is reachable in these programs (the verifier would reject the loop);
    // this only satisfies `no_std`.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
