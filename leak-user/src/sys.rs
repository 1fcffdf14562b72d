//! Facts about the host the agent asks the C library or procfs for: the page size, the clocks,
//! whether we are root, the kernel's symbol table.

use std::{collections::HashSet, sync::OnceLock};

/// The kernel's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|&size| size > 0)
        .unwrap_or(4096)
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks exist on every supported kernel.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns`, in nanoseconds.
pub fn boot_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
}

/// `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
pub fn unix_ns() -> u128 {
    u128::try_from(clock_ns(libc::CLOCK_REALTIME)).unwrap_or(0)
}

/// This boot's random id (`/proc/sys/kernel/random/boot_id`), empty if procfs does not say:
/// a kernel timestamp is unique only within one boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `CLOCK_REALTIME - CLOCK_BOOTTIME`, to turn `bpf_ktime_get_boot_ns` into wall-clock time.
pub fn realtime_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME)
}

/// The running kernel's release (`uname -r`), empty if procfs does not say.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Text symbols (`t`/`T`) of `/proc/kallsyms`, read once: it is several MB, and the attach
/// table asks about many functions.
fn kallsyms() -> &'static HashSet<String> {
    static SYMBOLS: OnceLock<HashSet<String>> = OnceLock::new();
    SYMBOLS.get_or_init(|| {
        let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
            return HashSet::new();
        };
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let kind = fields.nth(1)?;
                let name = fields.next()?;
                matches!(kind, "t" | "T").then(|| name.to_owned())
            })
            .collect()
    })
}

/// Whether the kernel has a (not inlined) function named `symbol`, by `/proc/kallsyms`.
pub fn kallsyms_has(symbol: &str) -> bool {
    kallsyms().contains(symbol)
}

/// The machine's memory (`MemTotal` of /proc/meminfo), in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
