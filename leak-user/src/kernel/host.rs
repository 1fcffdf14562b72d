//! What the host must allow before any program is loaded: root, a lockdown mode that lets BPF
//! read kernel memory, enough locked memory, and tracefs for the classic tracepoints.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use log::{debug, info};

use super::table::Hook;
use crate::sys::is_root;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "leak must run as root (it loads BPF programs: CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); \
         try `sudo leak` or `cargo xtask run`"
    )]
    NotRoot,
    #[error(
        "kernel lockdown is in `confidentiality` mode, which forbids reading kernel memory \
         from BPF; boot with lockdown=integrity or none"
    )]
    Lockdown,
}

/// Fails early, with what to do, where loading would fail later with a bare EPERM.
pub fn preflight() -> Result<(), HostError> {
    if !is_root() {
        return Err(HostError::NotRoot);
    }
    if let Ok(lockdown) = fs::read_to_string("/sys/kernel/security/lockdown") {
        if lockdown.contains("[confidentiality]") {
            return Err(HostError::Lockdown);
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK: raise it to unlimited,
/// or at least to the hard limit.
pub fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads only the struct we pass, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } == 0 {
        current.rlim_cur = current.rlim_max;
        // SAFETY: as above; a failure leaves the limit as it was, which the log below says.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &current) };
    }
    debug!(
        "RLIMIT_MEMLOCK stays at {} bytes ({error}); only kernels before 5.11 need more",
        current.rlim_cur
    );
}

/// Where tracefs may be mounted, in the order aya looks.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: &'static str,
}

impl Tracefs {
    /// Finds tracefs, mounting it at /sys/kernel/tracing when it is nowhere, as systemd does at
    /// boot: a node without it (a minimal init, a container with the host's /sys) still gets
    /// classic tracepoints. Call it once, before any program is attached: aya looks for
    /// tracefs once per process and keeps the answer.
    pub fn discover() -> Option<Self> {
        Self::mounted().or_else(|| Self::mount().then(Self::mounted).flatten())
    }

    fn mounted() -> Option<Self> {
        TRACEFS_ROOTS
            .into_iter()
            .find(|root| Path::new(root).join("events").is_dir())
            .map(|root| Self { root })
    }

    fn mount() -> bool {
        let target = TRACEFS_ROOTS[0];
        if !Path::new(target).is_dir() {
            return false;
        }
        let (Ok(source), Ok(path)) = (CString::new("tracefs"), CString::new(target)) else {
            return false;
        };
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; no mount
        // data is passed.
        let result = unsafe {
            libc::mount(
                source.as_ptr(),
                path.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if result == 0 {
            info!("mounted tracefs at {target} for the classic tracepoints");
            true
        } else {
            debug!(
                "cannot mount tracefs at {target}: {}",
                std::io::Error::last_os_error()
            );
            false
        }
    }

    pub fn root(&self) -> &'static str {
        self.root
    }

    /// The `format` file of `hook`'s classic tracepoint.
    pub fn format_path(&self, hook: Hook) -> Option<PathBuf> {
        let category = hook.category()?;
        Some(
            Path::new(self.root)
                .join("events")
                .join(category)
                .join(hook.name())
                .join("format"),
        )
    }

    /// The text of `hook`'s classic tracepoint format; `None` where the kernel has no such
    /// tracepoint.
    pub fn format(&self, hook: Hook) -> Option<String> {
        fs::read_to_string(self.format_path(hook)?).ok()
    }
}
