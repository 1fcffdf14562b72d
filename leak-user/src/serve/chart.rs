//! Server-rendered SVG charts of a cgroup's memory over time: usage, working set, page cache
//! and the limit, in MiB, limit hits and the kill marked. No script: the figure is complete as
//! served, and every number it draws is also in a `data-` attribute, so a test (or a person
//! with the inspector) can check the drawing against the JSON.

use std::fmt::Write as _;

use crate::model::timeline::{Point, SampleKind};

use super::html::escape;

/// One sample on the chart: `x_seconds` is relative to the chart's zero (the kill, or now).
#[derive(Clone, Debug)]
pub struct ChartPoint<'a> {
    pub x_seconds: f64,
    pub point: &'a Point,
}

/// How big the drawing is, in SVG user units.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub width: f64,
    pub height: f64,
}

impl Default for Size {
    fn default() -> Self {
        Self {
            width: 760.0,
            height: 320.0,
        }
    }
}

/// What each series is called and drawn with.
const SERIES: &[(&str, &str, &str)] = &[
    ("usage", "usage", "#1f77b4"),
    ("working_set", "working set", "#d62728"),
    ("page_cache", "page cache", "#2ca02c"),
];

const MARGIN_LEFT: f64 = 64.0;
const MARGIN_RIGHT: f64 = 16.0;
const MARGIN_TOP: f64 = 44.0;
const MARGIN_BOTTOM: f64 = 44.0;
const MIB: f64 = 1024.0 * 1024.0;

fn series_value(series: &str, point: &Point) -> u64 {
    match series {
        "usage" => point.usage_bytes,
        "working_set" => point.working_set_bytes,
        _ => point.page_cache_bytes,
    }
}

/// A round step for about `count` ticks over `span`.
fn tick_step(span: f64, count: f64) -> f64 {
    let raw = (span / count).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// The chart of `points` (oldest first). `x_label` names the x axis ("seconds before the
/// kill", "seconds ago"); `id` makes the element ids unique on a page with several charts.
pub fn svg(id: &str, title: &str, x_label: &str, points: &[ChartPoint<'_>], size: Size) -> String {
    let mut out = String::new();
    let plot_w = size.width - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = size.height - MARGIN_TOP - MARGIN_BOTTOM;
    let (min_x, max_x) = points.iter().fold((0.0f64, 0.0f64), |(lo, hi), p| {
        (lo.min(p.x_seconds), hi.max(p.x_seconds))
    });
    let min_x = if max_x - min_x < 1e-9 {
        max_x - 1.0
    } else {
        min_x
    };
    let max_bytes = points
        .iter()
        .flat_map(|p| {
            [
                p.point.usage_bytes,
                p.point.working_set_bytes,
                p.point.page_cache_bytes,
                p.point.limit_bytes.unwrap_or(0),
            ]
        })
        .max()
        .unwrap_or(0);
    let max_mib = ((max_bytes as f64 / MIB) * 1.08).max(1.0);
    let x_of = |x: f64| MARGIN_LEFT + (x - min_x) / (max_x - min_x) * plot_w;
    let y_of = |bytes: u64| MARGIN_TOP + plot_h - (bytes as f64 / MIB) / max_mib * plot_h;

    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="sans-serif" font-size="12" data-points="{count}">"#,
        id = escape(id),
        w = size.width,
        h = size.height,
        count = points.len(),
    );
    let _ = write!(out, "<title>{}</title>", escape(title));
    let _ = write!(
        out,
        r#"<rect x="0" y="0" width="{}" height="{}" fill="white"/><text x="{}" y="18" font-weight="bold">{}</text>"#,
        size.width,
        size.height,
        MARGIN_LEFT,
        escape(title)
    );

    // Axes and grid.
    let y_step = tick_step(max_mib, 5.0);
    let mut tick = 0.0;
    while tick <= max_mib + 1e-9 {
        let y = MARGIN_TOP + plot_h - tick / max_mib * plot_h;
        let _ = write!(
            out,
            r##"<line x1="{MARGIN_LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{tick}</text>"##,
            x2 = MARGIN_LEFT + plot_w,
            tx = MARGIN_LEFT - 6.0,
            ty = y + 4.0,
        );
        tick += y_step;
    }
    let x_step = tick_step(max_x - min_x, 6.0);
    let mut tick = (min_x / x_step).ceil() * x_step;
    while tick <= max_x + 1e-9 {
        let x = x_of(tick);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{MARGIN_TOP}" y2="{y2}" stroke="#eee"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{label}</text>"##,
            y2 = MARGIN_TOP + plot_h,
            ty = MARGIN_TOP + plot_h + 16.0,
            label = format_seconds(tick),
        );
        tick += x_step;
    }
    let _ = write!(
        out,
        r##"<text x="{cx}" y="{by}" text-anchor="middle">{x_label}</text><text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">MiB</text><rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
        cx = MARGIN_LEFT + plot_w / 2.0,
        by = size.height - 8.0,
        cy = MARGIN_TOP + plot_h / 2.0,
        x_label = escape(x_label),
    );

    // The limit, stepped (it can change), dashed.
    let limit_path: Vec<String> = points
        .iter()
        .filter_map(|p| {
            p.point
                .limit_bytes
                .map(|limit| format!("{:.1},{:.1}", x_of(p.x_seconds), y_of(limit)))
        })
        .collect();
    if !limit_path.is_empty() {
        let _ = write!(
            out,
            r##"<polyline class="series" data-series="limit" fill="none" stroke="#555" stroke-dasharray="6 4" stroke-width="1.5" points="{}"/>"##,
            limit_path.join(" ")
        );
    }
    for (series, _, color) in SERIES {
        let path: Vec<String> = points
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x_of(p.x_seconds),
                    y_of(series_value(series, p.point))
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline class="series" data-series="{series}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
    }

    // Every sample, with its figures, and the events: limit hits, charge failures, the kill.
    for p in points {
        let x = x_of(p.x_seconds);
        let kind = p.point.kind;
        let _ = write!(
            out,
            r#"<g class="sample" data-x-seconds="{:.3}" data-kind="{}" data-usage-bytes="{}" data-working-set-bytes="{}" data-page-cache-bytes="{}" data-limit-bytes="{}" data-before-kill-ms="{}">"#,
            p.x_seconds,
            kind.as_str(),
            p.point.usage_bytes,
            p.point.working_set_bytes,
            p.point.page_cache_bytes,
            p.point
                .limit_bytes
                .map_or_else(String::new, |l| l.to_string()),
            p.point
                .before_kill_ms
                .map_or_else(String::new, |ms| ms.to_string()),
        );
        for (series, _, color) in SERIES {
            let _ = write!(
                out,
                r#"<circle cx="{x:.1}" cy="{:.1}" r="1.6" fill="{color}"/>"#,
                y_of(series_value(series, p.point))
            );
        }
        match kind {
            SampleKind::LimitHit => {
                let _ = write!(
                    out,
                    r##"<path class="event limit-hit" d="M{x:.1},{t} l-4,-7 h8 z" fill="#ff7f0e"><title>limit hit</title></path>"##,
                    t = MARGIN_TOP,
                );
            }
            SampleKind::ChargeFailed => {
                let _ = write!(
                    out,
                    r##"<path class="event charge-failed" d="M{x:.1},{t} l-4,-7 h8 z" fill="#9467bd"><title>charge failed</title></path>"##,
                    t = MARGIN_TOP,
                );
            }
            SampleKind::Kill => {
                let _ = write!(
                    out,
                    r##"<line class="event kill" x1="{x:.1}" x2="{x:.1}" y1="{MARGIN_TOP}" y2="{y2}" stroke="black" stroke-width="2"/><text x="{tx:.1}" y="{ty}" text-anchor="end" font-weight="bold">OOM kill</text>"##,
                    y2 = MARGIN_TOP + plot_h,
                    tx = x - 4.0,
                    ty = MARGIN_TOP + 14.0,
                );
            }
            _ => {}
        }
        out.push_str("</g>");
    }

    // Legend.
    let mut legend_x = MARGIN_LEFT;
    for (_, label, color) in SERIES.iter().chain([&("limit", "limit", "#555")]) {
        let _ = write!(
            out,
            r#"<rect x="{legend_x:.1}" y="24" width="10" height="10" fill="{color}"/><text x="{:.1}" y="33">{label}</text>"#,
            legend_x + 14.0,
        );
        legend_x += 100.0;
    }
    out.push_str("</svg>");
    out
}

fn format_seconds(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 {
        format!("{}", value.round() as i64)
    } else {
        format!("{value:.1}")
    }
}

/// A kill's timeline as chart points: x is seconds before the kill (negative), the kill at 0.
pub fn kill_points(timeline: &[Point]) -> Vec<ChartPoint<'_>> {
    timeline
        .iter()
        .map(|point| ChartPoint {
            x_seconds: -(point.before_kill_ms.unwrap_or(0) as f64) / 1000.0,
            point,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(before_kill_ms: u64, usage_mib: u64, kind: SampleKind) -> Point {
        Point {
            boot_ns: 0,
            before_kill_ms: Some(before_kill_ms),
            kind,
            usage_bytes: usage_mib << 20,
            limit_bytes: Some(64 << 20),
            working_set_bytes: (usage_mib / 2) << 20,
            page_cache_bytes: (usage_mib / 2) << 20,
            inactive_file_bytes: 0,
            anon_bytes: 0,
        }
    }

    #[test]
    fn every_sample_is_drawn_with_its_figures() {
        let timeline = vec![
            point(3000, 10, SampleKind::Poll),
            point(1000, 64, SampleKind::LimitHit),
            point(0, 64, SampleKind::Kill),
        ];
        let svg = svg(
            "k1",
            "a <b>",
            "seconds before the kill",
            &kill_points(&timeline),
            Size::default(),
        );
        assert_eq!(svg.matches(r#"<g class="sample""#).count(), 3);
        assert!(svg.contains(r#"data-usage-bytes="67108864""#));
        assert!(svg.contains(r#"data-x-seconds="-3.000""#));
        assert_eq!(svg.matches("class=\"event limit-hit\"").count(), 1);
        assert_eq!(svg.matches("class=\"event kill\"").count(), 1);
        assert!(svg.contains("a &lt;b&gt;") && !svg.contains("a <b>"));
    }

    #[test]
    fn an_empty_or_single_point_chart_still_renders() {
        assert!(svg("e", "t", "s", &[], Size::default()).ends_with("</svg>"));
        let one = [point(0, 1, SampleKind::Kill)];
        let drawn = svg("o", "t", "s", &kill_points(&one), Size::default());
        assert!(!drawn.contains("NaN") && !drawn.contains("inf"), "{drawn}");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(128.0, 5.0), 50.0);
        assert_eq!(tick_step(10.0, 6.0), 2.0);
        assert_eq!(tick_step(0.5, 5.0), 0.1);
    }
}
