//! Ring buffer records, as the kernel (or a corrupted buffer) might hand them over: decoding
//! must never panic, and whatever decodes must build a kill.
#![no_main]

use leak_user::{cgroup::CgroupPaths, events, history};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = events::decode(data) {
        let context = events::Context {
            page_size: 4096,
            realtime_offset_ns: 0,
            attach_mode: "fuzz",
            seq: 1,
            same_oom_cgroup_id: None,
        };
        let kill = events::build_kill(&event, &context, &mut CgroupPaths::new(None));
        let _ = serde_json::to_string(&kill);
    }
    if let Ok(sample) = history::decode_sample(data) {
        let _ = history::Point::from_sample(&sample, 4096);
    }
});
