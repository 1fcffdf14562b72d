//! The agent's pages: the recent kills (`/`), one kill with its timeline (`/kill/{seq}`), and
//! the live series of the watched cgroups (`/live`). Rendered on the server, self-contained (no
//! script, font or stylesheet from elsewhere: nodes often have no internet), complete with
//! JavaScript disabled. Everything that came from the kernel or the node is escaped.

use std::fmt::Write as _;

use super::chart::{self, ChartPoint, Size};
use crate::model::{kill::Kill, kubernetes::CgroupLabels, timeline::Point};

/// Escapes text for HTML element content and quoted attribute values (and SVG).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters have no business in a page; show them as the kernel does.
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;\
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;\
font-variant-numeric:tabular-nums}a{color:#1f5fa8}nav a{margin-right:1em}\
.muted{color:#777}.chart{max-width:100%;height:auto;border:1px solid #ddd}";

fn page(title: &str, refresh_seconds: Option<u32>, body: &str) -> String {
    let refresh = refresh_seconds
        .map(|s| format!(r#"<meta http-equiv="refresh" content="{s}">"#))
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
         <title>{title}</title><style>{STYLE}</style></head><body>\
         <nav><a href=\"/\">kills</a><a href=\"/live\">live</a><a href=\"/metrics\">metrics</a>\
         <a href=\"/kills\">JSON</a></nav>{body}</body></html>",
        title = escape(title),
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn mib_or_none(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "no limit".to_owned(), mib)
}

/// Who died, as a person names it: the pod's container, else the cgroup.
fn workload(kill: &Kill) -> String {
    let names = &kill.names;
    if names.pod.is_empty() {
        kill.cgroup.clone()
    } else if names.container.is_empty() {
        format!("{}/{}", names.namespace, names.pod)
    } else {
        format!("{}/{}/{}", names.namespace, names.pod, names.container)
    }
}

fn main_process(kill: &Kill) -> &'static str {
    match (kill.main_process, kill.kubernetes.is_some()) {
        (Some(true), _) => "yes",
        (Some(false), true) => "no (the container survives)",
        (Some(false), false) => "no",
        (None, _) => "unknown",
    }
}

/// Whether the OOM killer killed the victim, as the kill witness saw it.
fn killed(kill: &Kill) -> &'static str {
    match kill.killed {
        Some(true) => "yes (SIGKILL)",
        Some(false) => "no: it was already exiting; the kernel only reaps its memory",
        None => "unknown (no kill witness attached)",
    }
}

/// `/`: the recent kills, newest first.
pub fn index<'a>(kills: impl Iterator<Item = &'a Kill>, attach_mode: &str) -> String {
    let mut rows = String::new();
    let mut count = 0;
    for kill in kills {
        count += 1;
        let _ = write!(
            rows,
            "<tr class=\"kill\" data-seq=\"{seq}\"><td><a href=\"/kill/{seq}\">{time}</a></td>\
             <td>{workload}</td><td>{comm} <span class=\"muted\">({pid}){exiting}</span></td>\
             <td>{main}</td><td class=\"n\">{usage}</td><td class=\"n\">{ws}</td>\
             <td class=\"n\">{limit}</td><td class=\"cause\">{cause}</td><td>{constraint}</td>\
             <td>{mode}</td></tr>",
            seq = kill.seq,
            time = escape(&kill.timestamp),
            workload = escape(&workload(kill)),
            comm = escape(kill.victim_comm.as_deref().unwrap_or("?")),
            pid = kill.victim_pid,
            exiting = match kill.killed {
                Some(false) => " marked while exiting, not killed",
                _ => "",
            },
            main = main_process(kill),
            usage = mib(kill.usage_bytes),
            ws = mib(kill.working_set_bytes),
            limit = mib_or_none(kill.limit_bytes),
            cause = kill.cause.as_ref().map_or_else(
                || "unknown".to_owned(),
                |cause| format!(
                    "{} ({:.0}%)",
                    cause.component.as_str(),
                    cause.share_of_usage * 100.0
                )
            ),
            constraint = kill.constraint.as_str(),
            mode = escape(&kill.attach_mode),
        );
    }
    let body = if count == 0 {
        "<p id=\"no-kills\">No OOM kills since the agent started.</p>".to_owned()
    } else {
        format!(
            "<table id=\"kills\"><thead><tr><th>time (UTC)</th><th>namespace/pod/container \
             or cgroup</th><th>process</th><th>main process</th><th>usage MiB</th>\
             <th>working set MiB</th><th>limit MiB</th><th>cause</th><th>constraint</th>\
             <th>attach mode</th>\
             </tr></thead><tbody>{rows}</tbody></table>"
        )
    };
    page(
        "leak: OOM kills",
        Some(10),
        &format!(
            "<h1>OOM kills</h1><p class=\"muted\">newest first; figures at the moment of death, \
             of the cgroup that hit its limit; OOM hook attached via {}</p>{body}",
            escape(attach_mode)
        ),
    )
}

/// `/kill/{seq}`: one kill, its timeline drawn, its cgroup chain as a table.
pub fn kill(kill: &Kill) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>OOM kill #{seq}: {comm} ({pid})</h1><table id=\"summary\">\
         <tr><th>time (UTC)</th><td>{time}</td></tr>\
         <tr><th>workload</th><td>{workload}</td></tr>\
         <tr><th>victim's cgroup</th><td>{cgroup}</td></tr>\
         <tr><th>cgroup that hit its limit</th><td>{oom}</td></tr>\
         <tr><th>main process of its container</th><td>{main}</td></tr>\
         <tr><th>killed</th><td id=\"killed\">{killed}</td></tr>\
         <tr><th>usage / working set / limit (MiB)</th><td>{usage} / {ws} / {limit}</td></tr>\
         <tr><th>cause</th><td id=\"cause\">{cause}</td></tr>\
         <tr><th>constraint</th><td>{constraint} ({attribution})</td></tr>\
         <tr><th>attach mode</th><td>{mode}</td></tr>\
         <tr><th>triggered by</th><td>{trigger} ({trigger_pid})</td></tr></table>",
        seq = kill.seq,
        comm = escape(kill.victim_comm.as_deref().unwrap_or("?")),
        pid = kill.victim_pid,
        time = escape(&kill.timestamp),
        workload = escape(&workload(kill)),
        cgroup = escape(&kill.cgroup),
        oom = escape(kill.oom_cgroup.as_deref().unwrap_or("none (a global OOM)")),
        main = main_process(kill),
        killed = killed(kill),
        usage = mib(kill.usage_bytes),
        ws = mib(kill.working_set_bytes),
        limit = mib_or_none(kill.limit_bytes),
        cause = kill.cause.as_ref().map_or_else(
            || "unknown (the kernel's statistics were not read)".to_owned(),
            |cause| format!(
                "{}: {} MiB, {:.0}% of usage",
                cause.component.as_str(),
                mib(cause.bytes),
                cause.share_of_usage * 100.0
            )
        ),
        constraint = kill.constraint.as_str(),
        attribution = match kill.attribution {
            crate::model::kill::OomAttribution::OomControl => "from the kernel's oom_control",
            crate::model::kill::OomAttribution::Inferred => "inferred from the usage",
        },
        mode = escape(&kill.attach_mode),
        trigger = escape(&kill.trigger.comm),
        trigger_pid = kill.trigger.pid,
    );
    if kill.timeline.is_empty() {
        body.push_str(
            "<p id=\"no-timeline\">No timeline: the charge path was off or saw nothing of this \
             cgroup before the kill.</p>",
        );
    } else {
        let title = format!(
            "{} in the seconds before the kill",
            kill.oom_cgroup.as_deref().unwrap_or(&kill.cgroup)
        );
        body.push_str(&chart::svg(
            "timeline",
            &title,
            "seconds before the kill",
            &chart::kill_points(&kill.timeline),
            Size::default(),
        ));
        if let Some(story) = &kill.story {
            let at = |ms: Option<u64>| {
                ms.map_or_else(
                    || "not in the window".to_owned(),
                    |ms| format!("{:.2} s before the kill", ms as f64 / 1000.0),
                )
            };
            let _ = write!(
                body,
                "<p id=\"story\">Usage reached the limit {}; the working set reached it {}. \
                 {} limit hits.</p>",
                at(story.usage_at_limit_ms_before_kill),
                at(story.working_set_at_limit_ms_before_kill),
                story.limit_hits,
            );
        }
    }
    body.push_str(
        "<h2>Memory cgroups at the kill</h2><table id=\"cgroups\"><thead><tr><th>cgroup</th>\
         <th>usage MiB</th><th>limit MiB</th><th>working set MiB</th><th>anon MiB</th>\
         <th>page cache MiB</th><th>inactive file MiB</th><th>unevictable MiB</th>\
         <th>hit its limit</th></tr></thead><tbody>",
    );
    // The cgroup that hit its limit above the eight levels, when it is, comes last.
    for level in kill.cgroups.iter().chain(&kill.oom_cgroup_state) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&level.path),
            mib(level.usage_bytes),
            mib_or_none(level.limit_bytes),
            mib(level.working_set_bytes),
            mib(level.anon_bytes()),
            mib(level.page_cache_bytes()),
            mib(level.inactive_file_bytes),
            mib(level.unevictable_bytes),
            if level.hit_limit { "yes" } else { "" },
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(
        "<h2>What filled them (MiB; &mdash; where the kernel keeps no such figure)</h2>\
         <table id=\"breakdown\"><thead><tr><th>cgroup</th>",
    );
    for name in leak_common::layout::stat::NAMES {
        let _ = write!(body, "<th>{name}</th>");
    }
    body.push_str("</tr></thead><tbody>");
    for level in kill.cgroups.iter().chain(&kill.oom_cgroup_state) {
        let _ = write!(body, "<tr><td>{}</td>", escape(&level.path));
        for value in level.breakdown.items() {
            match value {
                Some(bytes) => {
                    let _ = write!(body, "<td class=\"n\">{}</td>", mib(bytes));
                }
                None => body.push_str("<td class=\"n\">&mdash;</td>"),
            }
        }
        body.push_str("</tr>");
    }
    body.push_str("</tbody></table>");
    let _ = write!(
        body,
        "<p><a href=\"/kills/{}\">this kill as JSON</a></p>",
        kill.seq
    );
    page(&format!("leak: kill #{}", kill.seq), None, &body)
}

/// One watched cgroup's recent points, for `/live`.
#[derive(Clone, Debug)]
pub struct LiveSeries {
    pub labels: CgroupLabels,
    pub points: Vec<Point>,
}

/// `/live`: a chart per watched cgroup, x in seconds before `now_boot_ns`.
pub fn live(series: &[LiveSeries], now_boot_ns: u64) -> String {
    let mut body = String::from(
        "<h1>Watched cgroups</h1><p class=\"muted\">usage, working set, page cache and the \
         limit of every cgroup with a memory limit, from the charge path and a 5 s poll</p>",
    );
    if series.is_empty() {
        body.push_str("<p id=\"no-series\">No cgroup is watched yet.</p>");
    }
    for (index, one) in series.iter().enumerate() {
        let points: Vec<ChartPoint<'_>> = one
            .points
            .iter()
            .map(|point| ChartPoint {
                x_seconds: -(now_boot_ns.saturating_sub(point.boot_ns) as f64) / 1e9,
                point,
            })
            .collect();
        let names = &one.labels.names;
        let title = if names.pod.is_empty() {
            one.labels.cgroup.clone()
        } else {
            format!(
                "{}/{}/{} ({})",
                names.namespace, names.pod, names.container, one.labels.cgroup
            )
        };
        body.push_str(&chart::svg(
            &format!("live-{index}"),
            &title,
            "seconds ago",
            &points,
            Size {
                width: 760.0,
                height: 240.0,
            },
        ));
    }
    page("leak: live", Some(5), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_controls() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(escape("a\u{1b}b"), "a\\x1bb");
    }
}

#[cfg(test)]
#[path = "html_tests.rs"]
mod kill_page_tests;
