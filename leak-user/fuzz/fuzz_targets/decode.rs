//! Ring buffer records, as the kernel (or a corrupted buffer) might hand them over: decoding
//! must never panic, and whatever decodes must assemble into a kill that serializes.
#![no_main]

use leak_user::{
    decode,
    enrich::{
        cgroupfs::CgroupPaths,
        kill::{assemble, KillContext},
    },
    model::kill::StatsFreshness,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for page_size in [4096, 65536] {
        if let Ok(record) = decode::decode_kill(data, page_size) {
            let context = KillContext {
                page_size,
                realtime_offset_ns: 0,
                attach_mode: "fuzz",
                seq: 1,
                freshness: StatsFreshness {
                    report_hooked: true,
                    live_counters: false,
                    flush_interval_ms: Some(250),
                },
                kill_witness: true,
                same_oom_cgroup_id: None,
                cgroup_v2: Some(true),
            };
            let kill = assemble(&record, &context, &mut CgroupPaths::new(None));
            let _ = serde_json::to_string(&kill);
        }
        let _ = decode::decode_sample(data, page_size);
    }
});
