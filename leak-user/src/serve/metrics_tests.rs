//! The registry fed with kills assembled the way the agent assembles them.

use super::Metrics;
use crate::{
    decode::event::fixtures::{event, level, record, PAGE, UNLIMITED},
    enrich::{
        cgroupfs::CgroupPaths,
        kill::{assemble, KillContext},
    },
    model::kill::Kill,
};

fn build_kill(levels: &[leak_common::event::MemcgSnapshot], paths: &mut CgroupPaths) -> Kill {
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
    assemble(&record(&event(levels)), &context, paths)
}

#[test]
fn metrics_keep_a_bounded_number_of_kill_series() {
    let metrics = Metrics::with_kill_series_bound("test", 2).expect("metrics");
    let mut paths = CgroupPaths::new(None);
    for (id, name) in [(31, "first"), (32, "second"), (33, "third")] {
        let kill = build_kill(
            &[level(id, name, 10, 10, 0), level(1, "", 50, UNLIMITED, 0)],
            &mut paths,
        );
        metrics.record_kill(&kill);
    }
    let text = metrics.render().expect("render");
    assert!(
        !text.contains("cgroup=\"/first\""),
        "the oldest series is dropped:\n{text}"
    );
    assert!(
        !text.contains("leak_oom_kill_victim_timestamp_seconds{cgroup=\"/first\""),
        "and its victims with it"
    );
    assert!(
        text.contains("leak_oom_kills_total{cause=\"anon\",cgroup=\"/second\""),
        "the counter names the cause:\n{text}"
    );
    assert!(text.contains(
        "leak_oom_kill_victim_timestamp_seconds{cgroup=\"/third\",container=\"\",main_process=\"true\",namespace=\"\",oom_cgroup=\"/third\",pod=\"\",process=\"leak\"}"
    ));
    assert!(text.contains("leak_oom_kill_working_set_bytes{cgroup=\"/third\""));
}

#[test]
fn an_exiting_victim_is_not_a_kill() {
    let metrics = Metrics::new("test").expect("metrics");
    let mut paths = CgroupPaths::new(None);
    let levels = [level(31, "app", 10, 10, 0), level(1, "", 50, UNLIMITED, 0)];
    let mut marked = build_kill(&levels, &mut paths);
    marked.killed = Some(false);
    metrics.record_kill(&marked);
    let text = metrics.render().expect("render");
    assert!(!text.contains("leak_oom_kills_total{"), "{text}");
    assert!(!text.contains("leak_oom_kill_usage_bytes{"), "{text}");
    assert!(
        text.contains(
            "leak_oom_victims_exiting_total{cgroup=\"/app\",container=\"\",namespace=\"\",\
             oom_cgroup=\"/app\",pod=\"\"} 1"
        ),
        "{text}"
    );
    metrics.record_kill(&build_kill(&levels, &mut paths));
    let text = metrics.render().expect("render");
    assert!(
        text.contains("leak_oom_kills_total{cause=\"anon\",cgroup=\"/app\""),
        "{text}"
    );
}

#[test]
fn breakdown_gauges_follow_the_latest_poll_and_go_with_the_cgroup() {
    use crate::model::{
        kill::Breakdown,
        kubernetes::{CgroupLabels, WorkloadNames},
    };
    let metrics = Metrics::new("test").expect("metrics");
    let labels = CgroupLabels {
        cgroup: "/tmpfs".into(),
        names: WorkloadNames::default(),
    };
    let series = |component: &str| {
        format!(
            "leak_cgroup_memory_bytes{{cgroup=\"/tmpfs\",component=\"{component}\",container=\"\",\
             namespace=\"\",pod=\"\"}}"
        )
    };
    let mut breakdown = Breakdown {
        anon_bytes: Some(1 << 20),
        shmem_bytes: Some(60 << 20),
        ..Breakdown::default()
    };
    metrics.set_cgroup_breakdown(&labels, &breakdown);
    let text = metrics.render().expect("render");
    assert!(
        text.contains(&format!("{} 62914560", series("shmem"))),
        "{text}"
    );
    assert!(
        !text.contains(&series("swap")),
        "absent components have no series"
    );
    breakdown.shmem_bytes = None;
    metrics.set_cgroup_breakdown(&labels, &breakdown);
    let text = metrics.render().expect("render");
    assert!(
        !text.contains(&series("shmem")),
        "a component that went away is dropped"
    );
    metrics.forget_cgroup(&labels);
    let text = metrics.render().expect("render");
    assert!(!text.contains(&series("anon")), "{text}");
}
