//! A bar chart as SVG text, no dependencies: one row per measured figure, its bar (median
//! GB/s, with a whisker down to the worst run) over a lighter bar of the limit it is compared
//! with. Small enough to read in a browser or embedded in BENCHMARKS.md.

use std::fmt::Write;

/// One bar of the chart.
pub struct Bar {
    pub label: String,
    /// Median GB/s.
    pub value: f64,
    /// Worst run's GB/s (the whisker), if there was more than one.
    pub worst: Option<f64>,
    /// The machine's limit for the same work, GB/s.
    pub limit: Option<f64>,
    pub limit_label: String,
}

const ROW: f64 = 26.0;
const PLOT_W: f64 = 520.0;
/// Width of a 12 px sans-serif character, generously, to fit the longest label.
const CHAR_W: f64 = 7.0;
const TOP: f64 = 58.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart: `title`, a subtitle (the machine), and the bars on one linear GB/s axis.
pub fn svg(title: &str, subtitle: &str, bars: &[Bar]) -> String {
    let max = bars
        .iter()
        .flat_map(|b| [Some(b.value), b.limit])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let scale = nice_ceiling(max);
    let label_w = 20.0
        + CHAR_W
            * bars
                .iter()
                .map(|b| b.label.chars().count())
                .max()
                .unwrap_or(0) as f64;
    let x = |v: f64| label_w + (v.clamp(0.0, scale) / scale) * PLOT_W;
    let height = TOP + ROW * bars.len() as f64 + 50.0;
    let width = label_w + PLOT_W + 150.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{}</text>"##,
        esc(subtitle)
    );
    // Grid and axis labels: five steps.
    let bottom = TOP + ROW * bars.len() as f64;
    for i in 0..=5 {
        let v = scale * i as f64 / 5.0;
        let gx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{bottom}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            bottom + 16.0,
            trim(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">GB/s (bar: median; whisker: worst run; grey: the machine's limit)</text>"##,
        label_w + PLOT_W / 2.0,
        bottom + 36.0
    );
    for (i, b) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            label_w - 8.0,
            y + 16.0,
            esc(&b.label)
        );
        if let Some(l) = b.limit {
            let _ = writeln!(
                s,
                r##"<rect x="{label_w:.1}" y="{:.1}" width="{:.1}" height="20" fill="#d9d9d9"><title>{}: {l:.2} GB/s</title></rect>"##,
                y + 2.0,
                x(l) - label_w,
                esc(&b.limit_label)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{label_w:.1}" y="{:.1}" width="{:.1}" height="12" fill="#2b6cb0"><title>{}: {:.2} GB/s</title></rect>"##,
            y + 6.0,
            x(b.value) - label_w,
            esc(&b.label),
            b.value
        );
        if let Some(w) = b.worst {
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#1a365d" stroke-width="1.5"/>"##,
                x(w),
                y + 12.0,
                x(b.value),
                y + 12.0
            );
        }
        let note = match b.limit {
            Some(l) if l > 0.0 => {
                format!("{} ({:.0}% of limit)", trim(b.value), 100.0 * b.value / l)
            }
            _ => trim(b.value),
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}">{}</text>"##,
            label_w + PLOT_W + 8.0,
            y + 16.0,
            esc(&note)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The next "round" number (1, 2, 2.5 or 5 times a power of ten) at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn trim(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(12.0), 20.0);
        assert_eq!(nice_ceiling(22.0), 25.0);
        assert_eq!(nice_ceiling(0.07), 0.1);
        assert_eq!(nice_ceiling(50.0), 50.0);
    }

    #[test]
    fn bars_scale_to_the_largest_value_and_escape_labels() {
        let bars = [
            Bar {
                label: "L2 write <8 MiB>".into(),
                value: 1.0,
                worst: Some(0.5),
                limit: Some(2.0),
                limit_label: "disk".into(),
            },
            Bar {
                label: "L1 store".into(),
                value: 4.0,
                worst: None,
                limit: None,
                limit_label: String::new(),
            },
        ];
        let s = svg("t", "m", &bars);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("L2 write &lt;8 MiB&gt;") && !s.contains("<8 MiB>"));
        // Axis to 5 GB/s over 520 px: the 4 GB/s bar is 416 px wide, the 2 GB/s limit 208.
        assert!(s.contains(r#"width="416.0" height="12""#), "{s}");
        assert!(s.contains(r#"width="208.0" height="20""#), "{s}");
        assert!(s.contains("1.0 (50% of limit)"));
    }
}
