//! BTF blobs: a kernel's BTF is trusted input, but `--btf PATH` takes any file.
#![no_main]

use leak_user::kernel::layout::{Btf, Resolver};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data) {
        let _ = Resolver::new(btf).layout();
    }
});
