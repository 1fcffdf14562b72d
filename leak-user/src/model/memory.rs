//! Memory arithmetic shared by every stage: what "no limit" is, what the working set is, and
//! how close to a limit counts as "at" it.

pub use leak_common::sample::CHARGE_SLACK_PAGES;

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

#[cfg(test)]
mod tests {
    use super::*;

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
