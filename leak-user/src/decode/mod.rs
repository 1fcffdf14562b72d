//! Ring-buffer bytes to typed records: sizes and tags checked, pages turned into bytes with
//! checked arithmetic, flags turned into `Option`s. Pure functions of the bytes and the page
//! size, so they are unit-tested and fuzzed without a kernel; nothing here looks anything up.

pub mod event;
pub mod sample;

pub use event::{decode_kill, KillRecord, MemcgRecord, MemswRecord, OomControlRecord};
pub use sample::{decode_sample, Sample};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("unknown hook tag {0}")]
    UnknownHook(u32),
    #[error("unknown sample kind {0}")]
    UnknownKind(u32),
    #[error("cgroup depth {got} exceeds {max}")]
    Depth { got: u32, max: usize },
    #[error("{field} of {pages} pages does not fit in bytes")]
    Overflow { field: &'static str, pages: u64 },
}

/// A record type the kernel programs write to a ring buffer.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers and byte arrays with explicit
/// padding, for which every bit pattern is a valid value.
unsafe trait Record: Copy {}

// SAFETY: both are `#[repr(C)]`, integers and byte arrays only, padding explicit (their sizes
// are pinned by const assertions in leak-common).
unsafe impl Record for leak_common::event::OomKillEvent {}
// SAFETY: as above.
unsafe impl Record for leak_common::sample::ChargeSample {}

/// Copies a record of exactly `size_of::<T>()` bytes out of the ring buffer.
fn read_record<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length was checked; every bit pattern is a valid `T` (the `Record`
    // contract); read_unaligned copes with any alignment of the ring buffer's bytes.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// `pages * page_size`, or an error naming the field when a corrupt record overflows it.
fn bytes(field: &'static str, pages: u64, page_size: u64) -> Result<u64, DecodeError> {
    pages
        .checked_mul(page_size)
        .ok_or(DecodeError::Overflow { field, pages })
}
