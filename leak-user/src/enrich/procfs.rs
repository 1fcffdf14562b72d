//! What procfs still knows about a victim the kernel program could not read.

use std::path::Path;

use crate::model::kill::Kill;

/// Fills in the victim's process id, name and pid in its namespace from procfs when the kernel
/// program could not read its task (the classic tracepoint gives a thread id only). The victim
/// is dying but stays in procfs until it is reaped, which is usually long after we look.
pub fn fill_from_procfs(kill: &mut Kill, proc_root: &Path) {
    if kill.victim_task_resolved {
        return;
    }
    let status = proc_root.join(kill.victim_tid.to_string()).join("status");
    let Ok(status) = std::fs::read_to_string(status) else {
        return;
    };
    for line in status.lines() {
        if let Some(name) = line.strip_prefix("Name:") {
            kill.victim_comm = Some(name.trim().to_owned());
        } else if let Some(tgid) = line.strip_prefix("Tgid:") {
            // A task already detached from its pids (the last moments of exit) reads as 0.
            match tgid.trim().parse() {
                Ok(0) | Err(_) => {}
                Ok(tgid) => {
                    kill.victim_tgid = Some(tgid);
                    kill.victim_pid = tgid;
                }
            }
        }
    }
    // The process's pid in its own namespace is its leader's (the marked thread may be another).
    if let Some(ns_pid) = namespace_pid(proc_root, kill.victim_pid) {
        kill.victim_ns_pid = Some(ns_pid);
        kill.main_process = Some(ns_pid == 1);
    }
}

/// The last (innermost) pid of the `NSpid:` line of `/proc/<pid>/status`.
fn namespace_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?;
    match line.split_whitespace().last()?.parse() {
        Ok(0) | Err(_) => None,
        Ok(ns_pid) => Some(ns_pid),
    }
}
