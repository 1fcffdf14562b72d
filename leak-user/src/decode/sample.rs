//! Charge-path samples: one memory cgroup at one moment.

use leak_common::sample::{kind, ChargeSample};

use super::{bytes, read_record, DecodeError};
use crate::model::{
    memory::{is_unlimited, working_set_bytes},
    timeline::{Point, SampleKind},
};

/// A decoded sample: which cgroup, and its point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub cgroup_id: u64,
    pub point: Point,
}

fn sample_kind(tag: u32) -> Result<SampleKind, DecodeError> {
    match tag {
        kind::CHARGE => Ok(SampleKind::Charge),
        kind::LIMIT_HIT => Ok(SampleKind::LimitHit),
        kind::CHARGE_FAILED => Ok(SampleKind::ChargeFailed),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Decodes a [`ChargeSample`] record into bytes and a typed kind.
pub fn decode_sample(record: &[u8], page_size: u64) -> Result<Sample, DecodeError> {
    let sample: ChargeSample = read_record(record)?;
    let kind = sample_kind(sample.kind)?;
    let usage_bytes = bytes("usage", sample.usage_pages, page_size)?;
    let inactive_file_bytes = bytes("inactive_file", sample.inactive_file_pages, page_size)?;
    let active_file_bytes = bytes("active_file", sample.active_file_pages, page_size)?;
    let limit_bytes = match is_unlimited(sample.limit_pages, page_size) {
        true => None,
        false => Some(bytes("limit", sample.limit_pages, page_size)?),
    };
    Ok(Sample {
        cgroup_id: sample.cgroup_id,
        point: Point {
            boot_ns: sample.boot_ns,
            before_kill_ms: None,
            kind,
            usage_bytes,
            limit_bytes,
            working_set_bytes: working_set_bytes(usage_bytes, inactive_file_bytes),
            page_cache_bytes: inactive_file_bytes.saturating_add(active_file_bytes),
            inactive_file_bytes,
            anon_bytes: bytes("anon", sample.anon_pages, page_size)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(sample: &ChargeSample) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe {
            std::slice::from_raw_parts(
                (sample as *const ChargeSample).cast::<u8>(),
                size_of::<ChargeSample>(),
            )
        }
        .to_vec()
    }

    fn sample() -> ChargeSample {
        // SAFETY: ChargeSample is plain old data: all zeroes is a valid value.
        let mut sample: ChargeSample = unsafe { std::mem::zeroed() };
        sample.boot_ns = 1;
        sample.cgroup_id = 2;
        sample.usage_pages = 3;
        sample.limit_pages = 4;
        sample.inactive_file_pages = 1;
        sample.active_file_pages = 1;
        sample.anon_pages = 1;
        sample.kind = kind::LIMIT_HIT;
        sample
    }

    #[test]
    fn decodes_samples_and_rejects_garbage() {
        let good = sample();
        let decoded = decode_sample(&bytes_of(&good), 4096).expect("decodes");
        assert_eq!(decoded.cgroup_id, 2);
        assert_eq!(decoded.point.kind, SampleKind::LimitHit);
        assert_eq!(decoded.point.working_set_bytes, 2 * 4096);
        assert_eq!(decoded.point.page_cache_bytes, 2 * 4096);
        assert_eq!(decoded.point.limit_bytes, Some(4 * 4096));
        assert!(decode_sample(&bytes_of(&good)[1..], 4096).is_err());
        let mut bad = good;
        bad.kind = 77;
        assert_eq!(
            decode_sample(&bytes_of(&bad), 4096),
            Err(DecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn huge_page_counts_are_an_error_not_a_panic() {
        let mut huge = sample();
        huge.usage_pages = u64::MAX / 2;
        assert!(matches!(
            decode_sample(&bytes_of(&huge), 4096),
            Err(DecodeError::Overflow { field: "usage", .. })
        ));
        let mut unlimited = sample();
        unlimited.limit_pages = u64::MAX;
        let point = decode_sample(&bytes_of(&unlimited), 4096)
            .expect("decodes")
            .point;
        assert_eq!(point.limit_bytes, None);
    }
}
