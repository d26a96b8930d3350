//! The HTML report of `seckill load --report FILE.html`: one self-contained
//! page (inline CSS and SVG; no script, no font, no image, nothing fetched)
//! that reads at a glance, the way k6 and Gatling reports do: the verdict
//! first, then requests/s by outcome, latency percentiles and coupons
//! remaining over the run's time, with the publish and sell-out instants
//! marked.
//!
//! Pure: [`render`] turns a [`LoadReport`] into the page. What a run
//! measured becomes a [`LoadReport`] in `load.rs`.

use std::fmt::Write as _;

/// Everything the page shows.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// `namespace/name`.
    pub promotion: String,
    /// The base URL the load was sent to.
    pub target: String,
    /// When the load started, RFC 3339 UTC.
    pub started_at: String,
    /// The sampling interval of the plots, in seconds.
    pub bucket_secs: f64,
    /// The run's length, in seconds (the plots' time axis).
    pub duration_secs: f64,
    /// Headline figures, label then value, in order.
    pub figures: Vec<(String, String)>,
    /// Requests/s per outcome, one value per bucket.
    pub throughput: Vec<OutcomeSeries>,
    /// Latency percentiles per bucket, in milliseconds; `None` where the
    /// bucket holds no answer.
    pub latency: Percentiles,
    /// Coupons remaining as the answers tell it: number of coupons minus
    /// the grants answered so far, at (seconds, remaining).
    pub remaining_by_answers: Vec<(f64, f64)>,
    /// Coupons remaining as the query API said it, at (seconds, remaining).
    pub remaining_by_query: Vec<(f64, f64)>,
    /// The promotion's number of coupons, when known.
    pub number_of_coupons: Option<u64>,
    /// The publish instant (seconds since the start) and what it is.
    pub opened_at: Option<Marker>,
    /// The sell-out instant (seconds since the start) and what it is.
    pub sold_out_at: Option<Marker>,
    pub verdict: Verdict,
}

/// One outcome's requests/s over time.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeSeries {
    /// The outcome as the load summary names it (e.g. `granted`).
    pub outcome: String,
    /// Requests/s in each bucket.
    pub per_sec: Vec<f64>,
}

/// p50, p90 and p99 per bucket, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Percentiles {
    pub p50: Vec<Option<f64>>,
    pub p90: Vec<Option<f64>>,
    pub p99: Vec<Option<f64>>,
}

/// A vertical line at an instant, with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub at_secs: f64,
    pub label: String,
}

/// The verification's outcome and why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    /// What failed (FAILED), or what was proven (PASSED).
    pub reasons: Vec<String>,
}

/// The colour of an outcome's line: success green, the sale's own "no"
/// answers in calm colours, failures in red and black.
fn outcome_colour(outcome: &str) -> &'static str {
    match outcome {
        "granted" => "#2ca02c",
        "alreadyGranted" => "#17becf",
        "notStarted" => "#7f7f7f",
        "soldOut" => "#ff7f0e",
        "finished" => "#8c564b",
        "unknownPromotion" => "#9467bd",
        "rateLimited" => "#e377c2",
        "unavailable" => "#d62728",
        "clientError" => "#bcbd22",
        "transportError" => "#111111",
        _ => "#555555",
    }
}

/// HTML-escapes text (element content and attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Axis ticks from 0 to at least `max`: a step of 1, 2 or 5 times a power
/// of ten, about `target` steps. Returns (step, ticks).
pub fn ticks(max: f64, target: usize) -> (f64, Vec<f64>) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / target.max(1) as f64;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (step, (0..=n).map(|i| i as f64 * step).collect())
}

/// A tick label: `12k` from ten thousand up, else as many decimals as the
/// step needs.
fn tick_label(value: f64, step: f64) -> String {
    if value >= 10_000.0 && step >= 1_000.0 {
        let k = value / 1_000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round())
        } else {
            format!("{k:.1}k")
        }
    } else {
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10().floor()) as usize
        };
        format!("{value:.decimals$}")
    }
}

/// One line of a plot.
struct Line<'a> {
    label: &'a str,
    colour: &'a str,
    dash: Option<&'a str>,
    /// Runs of points; a gap (no data) between runs.
    runs: Vec<Vec<(f64, f64)>>,
}

/// One plot: an SVG with axes, ticks, units, a legend and the markers.
struct Plot<'a> {
    id: &'a str,
    title: &'a str,
    y_label: &'a str,
    x_max: f64,
    y_max: f64,
    lines: Vec<Line<'a>>,
    markers: Vec<&'a Marker>,
}

const WIDTH: f64 = 1180.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 66.0;
const BOTTOM: f64 = 56.0;

impl Plot<'_> {
    fn svg(&self) -> String {
        let (x_step, x_ticks) = ticks(self.x_max, 10);
        let (y_step, y_ticks) = ticks(self.y_max, 5);
        let x_end = x_ticks
            .last()
            .copied()
            .unwrap_or(1.0)
            .max(f64::MIN_POSITIVE);
        let y_end = y_ticks
            .last()
            .copied()
            .unwrap_or(1.0)
            .max(f64::MIN_POSITIVE);
        let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let x = |v: f64| LEFT + v.clamp(0.0, x_end) / x_end * w;
        let y = |v: f64| TOP + h - v.clamp(0.0, y_end) / y_end * h;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg id="{id}" class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{id}-title"><title id="{id}-title">{title}</title>"#,
            id = self.id,
            title = escape(self.title),
        );
        let _ = write!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="#fff" stroke="#999"/>"##
        );
        for t in &y_ticks {
            let _ = write!(
                s,
                r##"<line class="grid" x1="{LEFT}" x2="{x2:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text class="tick" x="{tx:.1}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
                x2 = LEFT + w,
                y = y(*t),
                tx = LEFT - 8.0,
                ty = y(*t) + 4.0,
                label = tick_label(*t, y_step),
            );
        }
        for t in &x_ticks {
            let _ = write!(
                s,
                r##"<line class="grid" x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{y2:.1}" stroke="#efefef"/><line x1="{x:.1}" x2="{x:.1}" y1="{y2:.1}" y2="{y3:.1}" stroke="#666"/><text class="tick" x="{x:.1}" y="{ty:.1}" text-anchor="middle">{label}</text>"##,
                x = x(*t),
                y2 = TOP + h,
                y3 = TOP + h + 5.0,
                ty = TOP + h + 20.0,
                label = tick_label(*t, x_step),
            );
        }
        let _ = write!(
            s,
            r#"<text class="axis" x="{cx:.1}" y="{ly:.1}" text-anchor="middle">time since the load started (s)</text><text class="axis" transform="translate(18 {cy:.1}) rotate(-90)" text-anchor="middle">{y_label}</text>"#,
            cx = LEFT + w / 2.0,
            ly = HEIGHT - 10.0,
            cy = TOP + h / 2.0,
            y_label = escape(self.y_label),
        );
        // Labels in the band between the legend and the plot: the first
        // marker's to the left of its line, the others' to the right, so
        // two close instants (a quick sell-out) do not overprint; turned
        // inwards where there is no room.
        for (i, m) in self.markers.iter().enumerate() {
            let mx = x(m.at_secs);
            let room = 7.0 * m.label.chars().count() as f64 + 12.0;
            let left = if i == 0 {
                mx - room >= LEFT
            } else {
                mx + room > LEFT + w
            };
            let _ = write!(
                s,
                r##"<g class="marker"><line x1="{mx:.1}" x2="{mx:.1}" y1="{y1:.1}" y2="{y2:.1}" stroke="#333" stroke-width="1.5" stroke-dasharray="6 4"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="{anchor}" class="marker-label">{label}</text></g>"##,
                y1 = TOP - 14.0,
                y2 = TOP + h,
                tx = if left { mx - 5.0 } else { mx + 5.0 },
                ty = TOP - 4.0,
                anchor = if left { "end" } else { "start" },
                label = escape(&m.label),
            );
        }
        for line in &self.lines {
            for run in &line.runs {
                let points: Vec<String> = run
                    .iter()
                    .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
                    .collect();
                let dash = line
                    .dash
                    .map(|d| format!(r#" stroke-dasharray="{d}""#))
                    .unwrap_or_default();
                if points.len() == 1 {
                    let (px, py) = run[0];
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#,
                        x(px),
                        y(py),
                        line.colour
                    );
                } else if !points.is_empty() {
                    let _ = write!(
                        s,
                        r#"<polyline class="series" data-series="{label}" points="{points}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"{dash}/>"#,
                        label = escape(line.label),
                        points = points.join(" "),
                        colour = line.colour,
                    );
                }
            }
        }
        // The legend, in a row above the plot area.
        let mut lx = LEFT;
        for line in &self.lines {
            let dash = line
                .dash
                .map(|d| format!(r#" stroke-dasharray="{d}""#))
                .unwrap_or_default();
            let _ = write!(
                s,
                r#"<g class="legend-item"><line x1="{lx:.1}" x2="{lx2:.1}" y1="24" y2="24" stroke="{colour}" stroke-width="3"{dash}/><text x="{tx:.1}" y="28">{label}</text></g>"#,
                lx2 = lx + 26.0,
                tx = lx + 32.0,
                colour = line.colour,
                label = escape(line.label),
            );
            lx += 44.0 + 7.2 * line.label.chars().count() as f64;
        }
        s.push_str("</svg>");
        s
    }
}

/// Bucket `i`'s centre, in seconds.
fn centre(i: usize, bucket_secs: f64) -> f64 {
    (i as f64 + 0.5) * bucket_secs
}

/// Runs of (time, value) from per-bucket values, split where a value is
/// missing.
fn runs(values: &[Option<f64>], bucket_secs: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (i, v) in values.iter().enumerate() {
        match v.filter(|v| v.is_finite()) {
            Some(v) => out
                .last_mut()
                .expect("never empty")
                .push((centre(i, bucket_secs), v)),
            None if out.last().is_some_and(|r| !r.is_empty()) => out.push(Vec::new()),
            None => {}
        }
    }
    out.retain(|r| !r.is_empty());
    out
}

fn max_of<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    values
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

/// The page.
pub fn render(report: &LoadReport) -> String {
    let bucket = if report.bucket_secs > 0.0 {
        report.bucket_secs
    } else {
        1.0
    };
    let x_max = report.duration_secs.max(bucket);
    let markers: Vec<&Marker> = report
        .opened_at
        .iter()
        .chain(report.sold_out_at.iter())
        .collect();

    let throughput = Plot {
        id: "plot-throughput",
        title: "Requests per second by outcome",
        y_label: "requests/s",
        x_max,
        y_max: max_of(report.throughput.iter().flat_map(|s| s.per_sec.iter())),
        lines: report
            .throughput
            .iter()
            .map(|s| Line {
                label: &s.outcome,
                colour: outcome_colour(&s.outcome),
                dash: None,
                runs: runs(
                    &s.per_sec.iter().copied().map(Some).collect::<Vec<_>>(),
                    bucket,
                ),
            })
            .collect(),
        markers: markers.clone(),
    };
    let latency = Plot {
        id: "plot-latency",
        title: "Latency percentiles",
        y_label: "latency (ms)",
        x_max,
        y_max: max_of(
            [
                &report.latency.p50,
                &report.latency.p90,
                &report.latency.p99,
            ]
            .into_iter()
            .flat_map(|v| v.iter().flatten()),
        ),
        lines: [
            ("p50", "#1f77b4", &report.latency.p50),
            ("p90", "#ff7f0e", &report.latency.p90),
            ("p99", "#d62728", &report.latency.p99),
        ]
        .into_iter()
        .map(|(label, colour, values)| Line {
            label,
            colour,
            dash: None,
            runs: runs(values, bucket),
        })
        .collect(),
        markers: markers.clone(),
    };
    let coupons_max = report
        .number_of_coupons
        .map(|n| n as f64)
        .unwrap_or(0.0)
        .max(max_of(
            report
                .remaining_by_answers
                .iter()
                .chain(&report.remaining_by_query)
                .map(|(_, v)| v),
        ));
    let coupons = Plot {
        id: "plot-coupons",
        title: "Coupons remaining",
        y_label: "coupons remaining",
        x_max,
        y_max: coupons_max,
        lines: vec![
            Line {
                label: "by the grants answered",
                colour: "#1f77b4",
                dash: None,
                runs: vec![report.remaining_by_answers.clone()],
            },
            Line {
                label: "as the query API reports it",
                colour: "#2ca02c",
                dash: Some("5 3"),
                runs: vec![report.remaining_by_query.clone()],
            },
        ],
        markers,
    };

    let mut page = String::new();
    let verdict_word = if report.verdict.passed {
        "PASSED"
    } else {
        "FAILED"
    };
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>seckill load: {promotion} — {verdict_word}</title>
<style>
body {{ font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 24px 32px; color: #222; background: #fafafa; }}
h1 {{ font-size: 26px; margin: 0 0 4px; }}
h2 {{ font-size: 19px; margin: 26px 0 6px; }}
.sub {{ color: #555; margin: 0 0 16px; font-size: 14px; }}
#verdict {{ border-radius: 6px; padding: 12px 18px; margin: 12px 0 8px; border: 2px solid; }}
#verdict.passed {{ background: #e8f6ea; border-color: #2ca02c; }}
#verdict.failed {{ background: #fdeaea; border-color: #d62728; }}
#verdict .word {{ font-size: 30px; font-weight: bold; letter-spacing: 1px; }}
#verdict.passed .word {{ color: #1e7b1e; }}
#verdict.failed .word {{ color: #b11d1d; }}
#verdict ul {{ margin: 6px 0 0; padding-left: 22px; font-size: 15px; }}
table.figures {{ border-collapse: collapse; font-size: 14px; margin-top: 10px; }}
table.figures td {{ padding: 3px 16px 3px 0; }}
table.figures td:first-child {{ color: #555; }}
svg.plot {{ background: #fff; border: 1px solid #ddd; border-radius: 4px; display: block; max-width: 100%; height: auto; }}
svg text {{ font-family: "DejaVu Sans", Arial, sans-serif; font-size: 13px; fill: #222; }}
svg text.tick {{ font-size: 12px; fill: #444; }}
svg text.axis {{ font-size: 13px; fill: #333; }}
svg text.marker-label {{ font-size: 12px; font-weight: bold; }}
.note {{ color: #666; font-size: 12px; margin: 4px 0 0; }}
</style></head>
<body>
<h1>seckill load: {promotion}</h1>
<p class="sub">Target {target} · started {started} · sampled every {bucket_ms:.0} ms</p>
<section id="verdict" class="{class}"><div class="word">Verification {verdict_word}</div><ul>"#,
        promotion = escape(&report.promotion),
        target = escape(&report.target),
        started = escape(&report.started_at),
        bucket_ms = bucket * 1000.0,
        class = verdict_word.to_ascii_lowercase(),
    );
    for reason in &report.verdict.reasons {
        let _ = write!(page, "<li>{}</li>", escape(reason));
    }
    page.push_str("</ul></section>\n<table class=\"figures\">");
    for (label, value) in &report.figures {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(label),
            escape(value)
        );
    }
    page.push_str("</table>\n");
    for (plot, note) in [
        (
            &throughput,
            "Answers per second in each sampling interval, by what they said.",
        ),
        (
            &latency,
            "Percentiles of the answers completed in each interval (client side, connection included).",
        ),
        (
            &coupons,
            "Solid: the number of coupons minus the grants answered so far. Dashed: the query API, polled during the run (it trails by the projection lag).",
        ),
    ] {
        let _ = write!(
            page,
            "<h2>{}</h2>\n{}\n<p class=\"note\">{}</p>\n",
            escape(plot.title),
            plot.svg(),
            escape(note)
        );
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LoadReport {
        let n = 50;
        let bucket = 0.2;
        LoadReport {
            promotion: "demo/flash-sale".into(),
            target: "http://127.0.0.1:8080".into(),
            started_at: "2026-12-01T14:00:00Z".into(),
            bucket_secs: bucket,
            duration_secs: n as f64 * bucket,
            figures: vec![("requests".into(), "22000".into())],
            throughput: vec![
                OutcomeSeries {
                    outcome: "notStarted".into(),
                    per_sec: (0..n).map(|i| if i < 25 { 300.0 } else { 0.0 }).collect(),
                },
                OutcomeSeries {
                    outcome: "granted".into(),
                    per_sec: (0..n)
                        .map(|i| if (25..30).contains(&i) { 1000.0 } else { 0.0 })
                        .collect(),
                },
            ],
            latency: Percentiles {
                p50: (0..n)
                    .map(|i| (i != 10).then_some(1.0 + i as f64 / 10.0))
                    .collect(),
                p90: vec![Some(3.0); n],
                p99: vec![Some(9.5); n],
            },
            remaining_by_answers: vec![(0.0, 1000.0), (5.0, 1000.0), (6.0, 0.0), (10.0, 0.0)],
            remaining_by_query: vec![(5.2, 800.0), (6.2, 0.0)],
            number_of_coupons: Some(1000),
            opened_at: Some(Marker {
                at_secs: 5.0,
                label: "publishTime".into(),
            }),
            sold_out_at: Some(Marker {
                at_secs: 6.0,
                label: "sold out".into(),
            }),
            verdict: Verdict {
                passed: true,
                reasons: vec!["no oversell".into()],
            },
        }
    }

    #[test]
    fn ticks_are_round_steps_that_cover_the_maximum() {
        assert_eq!(
            ticks(10.0, 10).1,
            (0..=10).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(ticks(1234.0, 5), (500.0, vec![0.0, 500.0, 1000.0, 1500.0]));
        assert_eq!(
            ticks(0.0, 5).1,
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        for max in [0.37, 3.0, 7.7, 42.0, 999.0, 1000.0, 1001.0, 65_432.0] {
            let (step, t) = ticks(max, 6);
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-9),
                "{max}: step {step}"
            );
            assert!(*t.last().unwrap() >= max - 1e-9, "{max}: {t:?}");
            assert!((3..=13).contains(&t.len()), "{max}: {t:?}");
        }
    }

    #[test]
    fn tick_labels_read_as_people_write_numbers() {
        assert_eq!(tick_label(20_000.0, 5_000.0), "20k");
        assert_eq!(tick_label(12_500.0, 2_500.0), "12.5k");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(0.05, 0.05), "0.05");
    }

    #[test]
    fn the_page_has_the_verdict_and_the_three_plots_and_nothing_to_fetch() {
        let page = render(&sample());
        for id in [
            r#"id="verdict""#,
            r#"id="plot-throughput""#,
            r#"id="plot-latency""#,
            r#"id="plot-coupons""#,
        ] {
            assert_eq!(page.matches(id).count(), 1, "{id}");
        }
        assert!(page.contains("Verification PASSED"));
        assert!(page.contains("requests/s") && page.contains("latency (ms)"));
        assert!(page.contains("time since the load started (s)"));
        // Legend entries and markers.
        for text in [
            ">granted<",
            ">notStarted<",
            ">p50<",
            ">p90<",
            ">p99<",
            ">publishTime<",
            ">sold out<",
        ] {
            assert!(page.contains(text), "{text}");
        }
        for forbidden in ["<script", "src=", "href=", "url(", "@import"] {
            assert!(!page.contains(forbidden), "{forbidden}");
        }
    }

    #[test]
    fn a_failed_verdict_lists_its_reasons_escaped() {
        let mut report = sample();
        report.verdict = Verdict {
            passed: false,
            reasons: vec!["oversold: 1001 > 1000 <b>".into()],
        };
        report.promotion = "x/<y>".into();
        let page = render(&report);
        assert!(page.contains(r#"class="failed""#));
        assert!(page.contains("Verification FAILED"));
        assert!(page.contains("<li>oversold: 1001 &gt; 1000 &lt;b&gt;</li>"));
        assert!(page.contains("x/&lt;y&gt;") && !page.contains("x/<y>"));
    }

    #[test]
    fn a_gap_in_the_latency_splits_its_line_and_markers_sit_at_their_instant() {
        let page = render(&sample());
        // p50 has a gap at bucket 10: two polylines.
        assert_eq!(page.matches(r#"data-series="p50""#).count(), 2);
        assert_eq!(page.matches(r#"data-series="p99""#).count(), 1);
        // 5 s of an axis of 0..10 s over 1076 px from x = 80.
        assert!(page.contains(r#"x1="618.0" x2="618.0""#), "publish marker");
        assert_eq!(page.matches(r#"class="marker""#).count(), 6, "two per plot");
    }

    #[test]
    fn an_empty_run_still_renders() {
        let page = render(&LoadReport::default());
        assert!(page.contains("Verification FAILED"));
        assert!(page.contains(r#"id="plot-coupons""#));
        assert!(!page.contains("NaN") && !page.contains("inf"));
    }
}
