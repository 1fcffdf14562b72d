//! What people look at, checked the way they see it: the agent's pages in a real browser
//! (Debian's headless Chromium, with JavaScript on and off) after real kills, one of them by a
//! process and in a cgroup whose names are markup; the Grafana dashboard's queries and the
//! alert rules evaluated by a real Prometheus while a workload leaks slowly towards its limit.

mod support;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use leak_user::model::{kill::Kill, timeline::Point};
use serde_json::Value;
use support::{browser::Browser, prometheus::Prometheus, *};

/// Where screenshots are kept: `target/browser/`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser");
    fs::create_dir_all(&dir).expect("target/browser");
    dir
}

/// The value of attribute `name` in an element's start tag, as Chromium serializes it.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = start + tag[start..].find('"')?;
    Some(
        tag[start..end]
            .replace("&amp;", "&")
            .replace("&quot;", "\""),
    )
}

/// The start tags of the chart's samples, in document order.
fn sample_tags(dom: &str) -> Vec<&str> {
    dom.match_indices("<g class=\"sample\"")
        .map(|(at, _)| {
            let end = at + dom[at..].find('>').unwrap_or(0);
            &dom[at..end]
        })
        .collect()
}

/// The drawn samples must be the timeline, point for point.
fn assert_chart_is_the_timeline(dom: &str, timeline: &[Point]) {
    let tags = sample_tags(dom);
    assert_eq!(
        tags.len(),
        timeline.len(),
        "one drawn sample per timeline point"
    );
    for (tag, point) in tags.iter().zip(timeline) {
        let number = |name: &str| -> Option<u64> { attribute(tag, name)?.parse().ok() };
        assert_eq!(number("data-usage-bytes"), Some(point.usage_bytes), "{tag}");
        assert_eq!(
            number("data-working-set-bytes"),
            Some(point.working_set_bytes),
            "{tag}"
        );
        assert_eq!(
            number("data-page-cache-bytes"),
            Some(point.page_cache_bytes),
            "{tag}"
        );
        assert_eq!(number("data-limit-bytes"), point.limit_bytes, "{tag}");
        assert_eq!(number("data-before-kill-ms"), point.before_kill_ms, "{tag}");
        assert_eq!(
            attribute(tag, "data-kind").as_deref(),
            Some(point.kind.as_str()),
            "{tag}"
        );
    }
}

/// Nothing from the node became markup: the page has no script, image or handler of its own,
/// so any in the DOM came from a name.
fn assert_no_injected_markup(dom: &str, page: &str) {
    let lower = dom.to_ascii_lowercase();
    for injected in ["<script", "<img", "data-pwned"] {
        assert!(!lower.contains(injected), "{page}: `{injected}` in the DOM");
    }
}

const HOSTILE_COMM: &str = "<script>alert(1";

#[test]
fn pages_draw_the_kills_and_show_hostile_names_as_text() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if !have_tool("chromium") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = Agent::start(&["--history", "120s"]);

    // A page-cache leak: a timeline with limit hits before the kill.
    let cgroup = Cgroup::with_limit(&hierarchy, "leak-e2e-pages", 48 << 20)
        .unwrap_or_else(|err| panic!("{err}"));
    let file = disk_file("leak-e2e-pages.dat");
    let path = file.0.to_string_lossy().into_owned();
    let mut leaking = spawn_in(
        &cgroup,
        &[
            "--interval",
            "1ms",
            "--chunk",
            "32KiB",
            "--file",
            &path,
            "--listen",
            "off",
        ],
    );
    wait_for_oom_kill(&mut leaking, Duration::from_secs(120));
    let drawn = agent.wait_for_kill(leaking.pid());
    assert!(drawn.timeline.len() >= 2, "a timeline: {drawn:?}");

    // A process whose name is markup, in a cgroup whose name is markup with quotes.
    let hostile_cgroup = Cgroup::create_at(
        &hierarchy,
        &format!(
            "/leak-e2e-<img src=x onerror=\"document.body.dataset.pwned=1\">'-{}",
            std::process::id()
        ),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    hostile_cgroup
        .set_limit(32 << 20)
        .unwrap_or_else(|err| panic!("{err}"));
    let links = TempDir::new("leak-e2e-hostile").unwrap_or_else(|err| panic!("{err}"));
    let hostile_exe = links.path().join(HOSTILE_COMM);
    std::os::unix::fs::symlink(leak_bin(), &hostile_exe).expect("symlink");
    let mut command = Command::new(&hostile_exe);
    command.args([
        "workload",
        "--interval",
        "1ms",
        "--chunk",
        "1MiB",
        "--listen",
        "off",
    ]);
    let mut hostile = spawn_command_in(&hostile_cgroup, command);
    wait_for_oom_kill(&mut hostile, Duration::from_secs(60));
    let named = agent.wait_for_kill(hostile.pid());
    assert_eq!(named.victim_comm.as_deref(), Some(HOSTILE_COMM));
    assert!(named.cgroup.contains("onerror=\""), "{}", named.cgroup);

    let base = format!("http://{}", agent.addr());
    let shots = artifacts();
    let mut browser = Browser::start();
    // The browser really runs scripts when asked to, and really does not otherwise: the
    // "JavaScript disabled" loads below prove something.
    let probe = "data:text/html,<p>x</p><script>document.body.dataset.ran='1'</script>";
    let ran = browser.load(probe, true, &shots.join("probe-js.png")).dom;
    assert!(ran.contains("data-ran=\"1\""), "{ran}");
    let ran = browser
        .load(probe, false, &shots.join("probe-nojs.png"))
        .dom;
    assert!(!ran.contains("data-ran"), "{ran}");
    for javascript in [true, false] {
        let mode = if javascript { "js" } else { "nojs" };
        let mut load = |name: &str, path: &str| -> String {
            let shot = shots.join(format!("{name}-{mode}.png"));
            let page = browser.load(&format!("{base}{path}"), javascript, &shot);
            assert_no_injected_markup(&page.dom, path);
            page.dom
        };
        // The list: both kills, newest first, the hostile names as text.
        let index = load("index", "/");
        let rows: Vec<u64> = index
            .match_indices("<tr class=\"kill\"")
            .filter_map(|(at, _)| attribute(&index[at..at + 80], "data-seq")?.parse().ok())
            .collect();
        assert_eq!(
            rows.first(),
            Some(&named.seq),
            "newest first: {rows:?} in {index}"
        );
        assert!(rows.contains(&drawn.seq), "{rows:?}");
        assert!(
            index.contains("&lt;script&gt;alert(1"),
            "the name shows as text"
        );
        assert!(index.contains("&lt;img src=x onerror=\"document.body.dataset.pwned=1\"&gt;'"));

        // The kill's page: the chart is the timeline of /kills/{seq}.
        let (status, json) = agent.get(&format!("/kills/{}", drawn.seq));
        assert_eq!(status, 200, "{json}");
        let served: Kill = serde_json::from_str(&json).expect("/kills/{seq} is a kill");
        let page = load("kill", &format!("/kill/{}", drawn.seq));
        assert_chart_is_the_timeline(&page, &served.timeline);
        assert!(page.contains("class=\"event kill\""), "the kill is marked");
        assert_eq!(
            page.matches("class=\"event limit-hit\"").count(),
            served
                .timeline
                .iter()
                .filter(|p| p.kind.as_str() == "limit_hit")
                .count(),
            "each limit hit is marked"
        );
        for level in &served.cgroups {
            assert!(
                page.contains(&format!("<td>{}</td>", level.path)),
                "{}",
                level.path
            );
        }

        let page = load("kill-hostile", &format!("/kill/{}", named.seq));
        assert!(page.contains("&lt;script&gt;alert(1"));

        let live = load("live", "/live");
        assert!(
            live.contains("class=\"chart\""),
            "a chart per watched cgroup"
        );
    }
    println!("screenshots in {}", shots.display());
    let (status, _) = agent.get("/kill/not-a-number");
    assert_eq!(status, 400);
    let (status, _) = agent.get("/kills/999999");
    assert_eq!(status, 404);
}

/// Every `leak_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("leak_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn workspace_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every query of every panel, with the dashboard's variables at "All".
fn dashboard_queries() -> Vec<(String, String)> {
    let text = fs::read_to_string(workspace_file("deploy/grafana/leak-dashboard.json"))
        .expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
                .replace("$container", ".*")
                .replace("$__rate_interval", "1m");
            queries.push((title.clone(), expr));
        }
    }
    assert!(queries.len() >= 6, "{queries:?}");
    queries
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The alert rules and the dashboard, evaluated by a real Prometheus scraping the agent while
/// a container's main process leaks slowly (minutes) to its limit and a child process in
/// another container is killed: the near-limit alert fires before the kill, the kill alerts
/// fire after it, and every dashboard query returns data.
#[test]
fn alerts_fire_before_the_kill_and_the_dashboard_has_data() {
    let Some(hierarchy) = privileged() else {
        return;
    };
    if !have_tool("prometheus") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = Agent::start(&[]);
    let rules = workspace_file("deploy/prometheus/leak-rules.yaml");
    let prometheus = Prometheus::start_with_rules(agent.addr(), &[&rules]);

    // A child process killed in its cgroup while nothing else there dies: main_process false.
    let side = Cgroup::with_limit(&hierarchy, "leak-e2e-alerts-child", 32 << 20)
        .unwrap_or_else(|err| panic!("{err}"));
    let mut child = spawn_in(
        &side,
        &["--interval", "1ms", "--chunk", "1MiB", "--listen", "off"],
    );
    wait_for_oom_kill(&mut child, Duration::from_secs(60));
    let child_kill = agent.wait_for_kill(child.pid());
    assert_eq!(child_kill.main_process, Some(false));

    // The main process of a "container" leaking about 250 KiB/s into 48 MiB: minutes.
    let limit: u64 = 48 << 20;
    let cgroup = Cgroup::with_limit(&hierarchy, "leak-e2e-alerts", limit)
        .unwrap_or_else(|err| panic!("{err}"));
    let relative = cgroup.relative.clone();
    let mut command = Command::new(leak_bin());
    command.args([
        "workload",
        "--interval",
        "20ms",
        "--chunk",
        "5KiB",
        "--listen",
        "off",
    ]);
    let mut leaking = spawn_command_as_init_in(&cgroup, command);
    let started = Instant::now();
    let near_limit = format!(
        "ALERTS{{alertname=\"LeakWorkingSetNearLimit\",alertstate=\"firing\",cgroup=\"{relative}\"}}"
    );
    let mut fired_at: Option<f64> = None;
    let deadline = Duration::from_secs(420);
    loop {
        let ended = leaking
            .wait_timeout(Duration::from_secs(1))
            .unwrap_or_else(|err| panic!("{err}"));
        if let Some(status) = ended {
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL),
                "the slow leak ended with {status}, not an OOM kill"
            );
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the slow leak was never killed"
        );
        if fired_at.is_none() && !prometheus.query(&near_limit).is_empty() {
            fired_at = Some(now_seconds());
            println!(
                "LeakWorkingSetNearLimit firing {:.0} s into the leak",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let kill = agent.wait_for_kill_in(&relative);
    assert_eq!(kill.main_process, Some(true), "pid 1 of its pid namespace");
    let killed_at = kill.timestamp_unix_ns as f64 / 1e9;
    let fired_at = fired_at.expect("LeakWorkingSetNearLimit never fired before the kill");
    let lead = killed_at - fired_at;
    leak_user::experiment::harness::report_figure(
        &current_test(),
        &format!(
            "LeakWorkingSetNearLimit fired {lead:.1} s before the OOM kill ({:.0} s of leaking)",
            started.elapsed().as_secs_f64()
        ),
    );
    assert!(lead > 0.0, "the alert fired {lead:.1} s before the kill");

    // The kill alerts name the process and container.
    let fired = prometheus.wait_for(&format!(
        "ALERTS{{alertname=\"LeakOOMKill\",alertstate=\"firing\",cgroup=\"{relative}\"}}"
    ));
    assert_eq!(fired[0]["metric"]["process"], "leak");
    assert_eq!(fired[0]["metric"]["main_process"], "true");
    let silent = prometheus.wait_for(&format!(
        "ALERTS{{alertname=\"LeakNonMainProcessOOMKill\",alertstate=\"firing\",cgroup=\"{}\"}}",
        child_kill.cgroup
    ));
    assert_eq!(silent[0]["metric"]["process"], "leak");

    // Every dashboard query returns data, and names only metrics the agent exports.
    let exported = agent.page("/metrics");
    for (title, expr) in dashboard_queries() {
        for name in metric_names(&expr) {
            assert!(
                exported.contains(&format!("\n{name}")) || exported.contains(&format!("{name}{{")),
                "panel {title:?} queries {name}, which the agent does not export"
            );
        }
        let result = prometheus.wait_for(&expr);
        assert!(
            !result.is_empty(),
            "panel {title:?}: {expr} returned nothing"
        );
    }
    let rules_text = fs::read_to_string(&rules).expect("rules");
    for name in metric_names(&rules_text) {
        assert!(
            exported.contains(&name),
            "the rules use {name}, which the agent does not export"
        );
    }
}
