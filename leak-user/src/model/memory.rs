//! Memory arithmetic shared by every stage: what "no limit" is, what the working set is, and
//! how close to a limit counts as "at" it.

pub use leak_common::sample::CHARGE_SLACK_PAGES;

use super::kill::{Breakdown, Cause, CauseKind};

/// `PAGE_COUNTER_MAX` is `LONG_MAX / PAGE_SIZE`: a limit at or above it, in pages, means "no
/// limit" (v2 prints `max`, v1 a number near `LONG_MAX` rounded down to a page).
pub fn unlimited_pages(page_size: u64) -> u64 {
    (i64::MAX as u64) / page_size.max(1)
}

/// Whether a limit of `limit_pages` is really no limit.
pub fn is_unlimited(limit_pages: u64, page_size: u64) -> bool {
    limit_pages >= unlimited_pages(page_size)
}

/// Whether a limit read from a cgroup file, in bytes, is really no limit.
pub fn is_unlimited_bytes(limit_bytes: u64, page_size: u64) -> bool {
    limit_bytes >= unlimited_pages(page_size).saturating_mul(page_size)
}

/// cAdvisor's and the kubelet's working set: usage minus inactive file cache, floored at 0.
pub fn working_set_bytes(usage_bytes: u64, inactive_file_bytes: u64) -> u64 {
    usage_bytes.saturating_sub(inactive_file_bytes)
}

/// A single charge can ask for up to one huge page, so "at the limit" means within that much
/// of it; on small limits at most a sixteenth of the limit, so a 16 MiB cgroup at 14 MiB is
/// not "at" it.
pub fn at_limit(value_bytes: u64, limit_bytes: u64, page_size: u64) -> bool {
    let slack = CHARGE_SLACK_PAGES
        .saturating_mul(page_size)
        .min(limit_bytes / 16);
    value_bytes.saturating_add(slack) >= limit_bytes
}

/// The largest component of `breakdown` that could not be reclaimed, with its share of
/// `usage_bytes`: anonymous memory, shmem (tmpfs), kernel memory, or dirty and writeback page
/// cache. Clean page cache is left out: the kernel reclaims it before it kills.
pub fn cause(breakdown: &Breakdown, usage_bytes: u64) -> Option<Cause> {
    let candidates = [
        (CauseKind::Anon, breakdown.anon_bytes),
        (CauseKind::Shmem, breakdown.shmem_bytes),
        (CauseKind::Kernel, breakdown.kernel_bytes()),
        (CauseKind::FileDirty, breakdown.dirty_bytes()),
    ];
    let (component, bytes) = candidates
        .into_iter()
        .filter_map(|(kind, bytes)| Some((kind, bytes?)))
        .filter(|&(_, bytes)| bytes > 0)
        // The first of equals wins: `max_by_key` would keep the last.
        .fold(
            None,
            |best: Option<(CauseKind, u64)>, candidate| match best {
                Some(best) if best.1 >= candidate.1 => Some(best),
                _ => Some(candidate),
            },
        )?;
    Some(Cause {
        component,
        bytes,
        share_of_usage: if usage_bytes == 0 {
            0.0
        } else {
            bytes as f64 / usage_bytes as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cause_is_the_largest_unreclaimable_component() {
        let mib = 1 << 20;
        let mut breakdown = Breakdown {
            anon_bytes: Some(10 * mib),
            file_bytes: Some(50 * mib),
            shmem_bytes: Some(40 * mib),
            file_dirty_bytes: Some(mib),
            file_writeback_bytes: Some(0),
            slab_reclaimable_bytes: Some(mib),
            slab_unreclaimable_bytes: Some(mib),
            kernel_stack_bytes: Some(mib / 4),
            pagetables_bytes: Some(mib / 4),
            sock_bytes: None,
            percpu_bytes: Some(mib / 2),
            swap_bytes: Some(0),
        };
        let found = cause(&breakdown, 64 * mib).expect("a cause");
        assert_eq!(
            found.component,
            CauseKind::Shmem,
            "tmpfs, not the file cache it sits in"
        );
        assert_eq!(found.bytes, 40 * mib);
        assert!((found.share_of_usage - 0.625).abs() < 1e-9);

        breakdown.shmem_bytes = Some(0);
        breakdown.slab_unreclaimable_bytes = Some(20 * mib);
        let found = cause(&breakdown, 64 * mib).expect("a cause");
        assert_eq!(found.component, CauseKind::Kernel);
        assert_eq!(
            found.bytes,
            22 * mib,
            "slab, stacks, page tables and per-CPU summed"
        );

        breakdown.slab_unreclaimable_bytes = Some(0);
        breakdown.file_writeback_bytes = Some(30 * mib);
        assert_eq!(
            cause(&breakdown, 64 * mib).map(|c| c.component),
            Some(CauseKind::FileDirty)
        );
        assert_eq!(
            cause(&Breakdown::default(), 64 * mib),
            None,
            "no statistics, no cause"
        );
    }

    #[test]
    fn unlimited_is_page_counter_max() {
        assert!(is_unlimited(i64::MAX as u64 / 4096, 4096));
        assert!(!is_unlimited(i64::MAX as u64 / 4096 - 1, 4096));
        assert!(
            is_unlimited_bytes(9223372036854771712, 4096),
            "v1's unlimited"
        );
        assert!(!is_unlimited_bytes(128 << 20, 4096));
    }

    #[test]
    fn working_set_floors_at_zero() {
        assert_eq!(working_set_bytes(100, 30), 70);
        assert_eq!(working_set_bytes(10, 30), 0);
    }

    #[test]
    fn at_limit_allows_one_huge_page_or_a_sixteenth() {
        let mib = 1 << 20;
        assert!(at_limit(126 * mib, 128 * mib, 4096));
        assert!(!at_limit(125 * mib, 128 * mib, 4096));
        assert!(at_limit(15 * mib, 16 * mib, 4096));
        assert!(!at_limit(14 * mib, 16 * mib, 4096));
    }
}
