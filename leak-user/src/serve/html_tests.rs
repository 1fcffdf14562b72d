//! The kill page, from a kill assembled the way the agent assembles it.

#[test]
fn the_kill_page_names_the_cause_and_what_filled_each_cgroup() {
    use crate::{
        decode::event::fixtures::{event, level, record, PAGE, UNLIMITED},
        enrich::{
            cgroupfs::CgroupPaths,
            kill::{assemble, KillContext},
        },
    };
    let context = KillContext {
        page_size: PAGE,
        realtime_offset_ns: 0,
        attach_mode: "tp_btf",
        seq: 1,
        freshness: Default::default(),
        same_oom_cgroup_id: None,
        cgroup_v2: Some(true),
        kill_witness: true,
    };
    let levels = [
        level(31, "app", 16384, 16384, 0),
        level(1, "", 20000, UNLIMITED, 0),
    ];
    let kill = assemble(
        &record(&event(&levels)),
        &context,
        &mut CgroupPaths::new(None),
    );
    let page = super::kill(&kill);
    assert!(
        page.contains("<td id=\"cause\">anon: 64.0 MiB, 100% of usage</td>"),
        "{page}"
    );
    assert!(page.contains("<table id=\"breakdown\">"), "{page}");
    assert!(page.contains("<th>slab_unreclaimable</th>"), "{page}");
}
