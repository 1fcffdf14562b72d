//! The original experiment as one figure: the anonymous run and the page-cache run side by
//! side, each from its kill's own timeline (usage, working set, page cache, the limit, the
//! kill marked), as `leak demo --svg` writes it.

use crate::{
    model::kill::Kill,
    serve::{
        chart::{self, Size},
        html::escape,
    },
};

const PANEL: Size = Size {
    width: 640.0,
    height: 340.0,
};

/// Both runs side by side; `caption` goes under them (where and when it was measured).
pub fn demo_svg(anon: &Kill, page_cache: &Kill, caption: &str) -> String {
    let panels = [
        ("anon", "run 1: anonymous memory only", anon),
        (
            "page-cache",
            "run 2: anonymous memory + page cache (fsync)",
            page_cache,
        ),
    ];
    let width = PANEL.width * 2.0 + 20.0;
    let height = PANEL.height + 60.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif"><rect width="{width}" height="{height}" fill="white"/>"#
    );
    for (index, (id, title, kill)) in panels.into_iter().enumerate() {
        let x = index as f64 * (PANEL.width + 20.0);
        let panel = chart::svg(
            id,
            title,
            "seconds before the kill",
            &chart::kill_points(&kill.timeline),
            PANEL,
        );
        // A nested <svg> is positioned by x/y; the panel's own root element takes them.
        out.push_str(&panel.replacen("<svg ", &format!(r#"<svg x="{x}" y="0" "#), 1));
        let story = kill.story.clone().unwrap_or_default();
        let at = |ms: Option<u64>| {
            ms.map_or_else(
                || "never".to_owned(),
                |ms| format!("{:.2} s", ms as f64 / 1000.0),
            )
        };
        out.push_str(&format!(
            r#"<text x="{tx}" y="{ty}" font-size="12">usage at the limit {u} before the kill, working set {w} before</text>"#,
            tx = x + 64.0,
            ty = PANEL.height + 16.0,
            u = at(story.usage_at_limit_ms_before_kill),
            w = at(story.working_set_at_limit_ms_before_kill),
        ));
    }
    out.push_str(&format!(
        r##"<text x="10" y="{}" font-size="12" fill="#555">{}</text></svg>"##,
        height - 12.0,
        escape(caption)
    ));
    out
}
