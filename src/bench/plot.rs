//! A line plot as SVG, by plain string formatting: throughput against
//! request size, the size axis in powers of two (log2), one polyline per
//! series, with axes, ticks, axis labels and a legend. No f64 logarithm or
//! power: std's would link libm, and the binary links only libc.

use std::fmt::Write;

/// One line: `points` are (bytes, value), drawn in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// Which colour (series of one server share it).
    pub color: usize,
    pub dashed: bool,
    /// (request bytes, value).
    pub points: Vec<(u64, f64)>,
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// log2 of `x` (≥ 1): exact at powers of two, which the sweep's sizes
/// are, and linear between them.
fn octaves(x: u64) -> f64 {
    let x = x.max(1);
    let e = x.ilog2();
    let base = 1u64 << e;
    f64::from(e) + (x - base) as f64 / base as f64
}

/// Where `x` lands between `left` and `right` when `lo..hi` spans them on a
/// log2 scale.
pub fn log2_place(x: u64, lo: u64, hi: u64, left: f64, right: f64) -> f64 {
    let (a, b) = (octaves(lo), octaves(hi));
    if b <= a {
        return (left + right) / 2.0;
    }
    left + (octaves(x) - a) / (b - a) * (right - left)
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about five
/// ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let mut pow = 1.0;
    while pow * 10.0 <= raw {
        pow *= 10.0;
    }
    while pow > raw {
        pow /= 10.0;
    }
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * pow).find(|s| *s >= raw).unwrap_or(10.0 * pow)
}

/// `4096` as `4K`, `1048576` as `1M`.
pub fn bytes_label(b: u64) -> String {
    if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole SVG document.
pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let lo = all().map(|p| p.0).filter(|x| *x > 0).min();
    let hi = all().map(|p| p.0).max();
    let (lo, hi) = lo.zip(hi).unwrap_or((1, 2));
    let ymax_data = all().map(|p| p.1).fold(0.0, f64::max);
    let step = nice_step(if ymax_data > 0.0 { ymax_data } else { 1.0 });
    let ymax = (ymax_data / step).ceil().max(1.0) * step;

    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (HEIGHT - BOTTOM, TOP); // y0 is the bottom
    let px = |x: u64| log2_place(x, lo, hi, x0, x1);
    let py = |y: f64| y0 - y / ymax * (y0 - y1);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        (x0 + x1) / 2.0,
        esc(title)
    );
    // Grid and ticks: y every `step`, x at each power of two.
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let y = py(v);
        let _ = writeln!(s, r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#ddd"/>"##);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"#, x0 - 6.0, y + 4.0);
        v += step;
    }
    for b in (lo.ilog2()..=hi.ilog2()).map(|e| 1u64 << e).filter(|b| (lo..=hi).contains(b)) {
        let x = px(b);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{y1:.1}" x2="{x:.1}" y2="{y0:.1}" stroke="#eee"/>"##);
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/>"#, y0 + 5.0);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, y0 + 18.0, bytes_label(b));
    }
    // Axes and their labels.
    let _ = writeln!(s, r#"<line x1="{x0:.1}" y1="{y0:.1}" x2="{x1:.1}" y2="{y0:.1}" stroke="black"/>"#);
    let _ = writeln!(s, r#"<line x1="{x0:.1}" y1="{y0:.1}" x2="{x0:.1}" y2="{y1:.1}" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 15.0,
        esc(x_label)
    );
    let (lx, ly) = (22.0, (y0 + y1) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx} {ly:.1})">{}</text>"#,
        esc(y_label)
    );
    // The lines, with a dot per point, and the legend.
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[ser.color % COLORS.len()];
        let dash = if ser.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let pts: Vec<String> =
            ser.points.iter().filter(|p| p.0 > 0).map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            pts.join(" ")
        );
        for p in ser.points.iter().filter(|p| p.0 > 0) {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(p.0), py(p.1));
        }
        let ly = y1 + 10.0 + 22.0 * i as f64;
        let lx = x1 + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 30.0
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 38.0, ly + 4.0, esc(&ser.name));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_placed_on_a_log2_axis() {
        let (lo, hi) = (4096, 1048576); // 2^12 .. 2^20
        assert_eq!(log2_place(lo, lo, hi, 100.0, 900.0), 100.0);
        assert_eq!(log2_place(hi, lo, hi, 100.0, 900.0), 900.0);
        assert_eq!(log2_place(65536, lo, hi, 100.0, 900.0), 500.0, "2^16 is half way");
        assert_eq!(log2_place(8192, lo, hi, 100.0, 900.0), 200.0);
        assert_eq!(log2_place(6144, lo, hi, 100.0, 900.0), 150.0, "linear inside an octave");
        assert_eq!(log2_place(8192, 8192, 8192, 100.0, 900.0), 500.0, "one size: the middle");
        assert_eq!(bytes_label(4096), "4K");
        assert_eq!(bytes_label(1048576), "1M");
        assert_eq!(bytes_label(512), "512");
        assert_eq!(nice_step(1234.0), 500.0);
        assert_eq!(nice_step(10.0), 2.0);
        assert!((nice_step(0.3) - 0.1).abs() < 1e-12);
        assert_eq!(nice_step(6000.0), 2000.0);
    }

    #[test]
    fn one_polyline_per_series_with_axes_and_legend() {
        let pts = |k: f64| [4096u64, 65536, 1048576].iter().map(|&x| (x, k * f64::from(x.ilog2()))).collect();
        let series = [
            Series { name: "a <read>".into(), color: 0, dashed: false, points: pts(100.0) },
            Series { name: "a write".into(), color: 0, dashed: true, points: pts(50.0) },
            Series { name: "b read".into(), color: 1, dashed: false, points: pts(80.0) },
        ];
        let s = svg("Throughput", "request size (bytes, log2)", "MB/s", &series);
        assert!(s.starts_with("<svg ") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert_eq!(s.matches("stroke-dasharray").count(), 2, "the dashed line and its legend entry");
        for text in ["Throughput", "request size (bytes, log2)", ">MB/s<", ">4K<", ">64K<", ">1M<", "a &lt;read&gt;", "b read"] {
            assert!(s.contains(text), "{text}");
        }
        // Ticks at every power of two in range: 4K..1M is nine.
        assert_eq!(s.matches(r#"text-anchor="middle">"#).count() - 1, 9, "and the x label");
        // The first point of the first line sits on the y axis.
        assert!(s.contains(r#"points="80.0,"#), "{s}");
        assert!(!svg("t", "x", "y", &[]).contains("<polyline"));
    }
}
