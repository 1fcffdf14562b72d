//! What procfs still knows about a victim the kernel program could not read.

use std::path::Path;

use crate::model::kill::Kill;

/// Fills in the victim's process id and name from procfs when the kernel program could not
/// read its task (the classic tracepoint gives a thread id only). The victim is dying but stays
/// in procfs until it is reaped, which is usually long after we look.
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
}
