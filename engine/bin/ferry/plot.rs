//! `ferry bench --plot FILE.svg`: GB/s against block size, one panel per direction, a line per
//! strategy (solid idle, dashed under the compute load), the PCIe ceiling as a grey line. Plain
//! SVG written by hand: no plotting library, no fonts, nothing to install.

use std::fmt::Write;

/// One line of a panel.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Colour index (one per strategy).
    pub colour: usize,
    /// Dashed: measured under the compute load.
    pub dashed: bool,
    /// GB/s at each block size.
    pub values: Vec<f64>,
}

/// One panel: a direction.
pub struct Panel {
    /// Title ("host to GPU").
    pub title: String,
    /// The ceiling, GB/s.
    pub ceiling: f64,
    /// Its lines.
    pub series: Vec<Series>,
}

const COLOURS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
const PANEL_W: f64 = 520.0;
const PANEL_H: f64 = 360.0;
const MARGIN_L: f64 = 60.0;
const MARGIN_B: f64 = 50.0;
const MARGIN_T: f64 = 40.0;
const LEGEND_W: f64 = 170.0;

/// The SVG document: `panels` side by side over `sizes` (bytes, log scale), with `title`.
pub fn render(title: &str, sizes: &[u64], panels: &[Panel]) -> String {
    let y_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.values.iter().copied()).chain([p.ceiling]))
        .fold(1.0f64, f64::max)
        * 1.08;
    let width = panels.len() as f64 * (PANEL_W + LEGEND_W) + 20.0;
    let height = PANEL_H + MARGIN_T + MARGIN_B + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="10" y="20" font-size="15">{}</text>"#, escape(title));
    for (i, panel) in panels.iter().enumerate() {
        let x0 = 10.0 + i as f64 * (PANEL_W + LEGEND_W);
        render_panel(&mut svg, x0, 30.0, sizes, y_max, panel);
    }
    svg.push_str("</svg>\n");
    svg
}

fn render_panel(svg: &mut String, x0: f64, y0: f64, sizes: &[u64], y_max: f64, panel: &Panel) {
    let (left, top) = (x0 + MARGIN_L, y0 + MARGIN_T);
    let (w, h) = (PANEL_W - MARGIN_L - 10.0, PANEL_H - MARGIN_B);
    let logs: Vec<f64> = sizes.iter().map(|&s| (s as f64).log2()).collect();
    let (lo, hi) = (logs.first().copied().unwrap_or(0.0), logs.last().copied().unwrap_or(1.0));
    let span = (hi - lo).max(1.0);
    let x = |log: f64| left + (log - lo) / span * w;
    let y = |gb: f64| top + h - gb / y_max * h;
    let _ =
        writeln!(svg, r#"<text x="{:.1}" y="{:.1}" font-size="13">{}</text>"#, left, top - 12.0, escape(&panel.title));
    // Axes, grid and ticks.
    let _ = writeln!(
        svg,
        r##"<rect x="{left:.1}" y="{top:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="#444"/>"##
    );
    let step = if y_max > 40.0 { 10.0 } else { 5.0 };
    let mut tick = 0.0;
    while tick <= y_max {
        let ty = y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left:.1}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.0}</text>"##,
            left + w,
            left - 6.0,
            ty + 4.0
        );
        tick += step;
    }
    for (&size, &log) in sizes.iter().zip(&logs) {
        let tx = x(log);
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{:.1}" y2="{:.1}" stroke="#444"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + h,
            top + h + 5.0,
            top + h + 18.0,
            human(size)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">block size</text>"#,
        left + w / 2.0,
        top + h + 36.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">GB/s</text>"#,
        x0 + 16.0,
        top + h / 2.0
    );
    // The ceiling.
    let cy = y(panel.ceiling);
    let _ = writeln!(
        svg,
        r##"<line x1="{left:.1}" x2="{:.1}" y1="{cy:.1}" y2="{cy:.1}" stroke="#888" stroke-width="2"/>"##,
        left + w
    );
    // The lines, and the legend beside the panel.
    let legend_x = left + w + 14.0;
    let _ = writeln!(
        svg,
        r##"<line x1="{legend_x:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#888" stroke-width="2"/><text x="{:.1}" y="{:.1}">ceiling {:.1}</text>"##,
        legend_x + 24.0,
        top + 4.0,
        top + 4.0,
        legend_x + 30.0,
        top + 8.0,
        panel.ceiling
    );
    for (k, series) in panel.series.iter().enumerate() {
        let colour = COLOURS[series.colour % COLOURS.len()];
        let dash = if series.dashed { r#" stroke-dasharray="6,4""# } else { "" };
        let points: Vec<String> =
            logs.iter().zip(&series.values).map(|(&l, &v)| format!("{:.1},{:.1}", x(l), y(v))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').expect("x,y");
            let _ = writeln!(svg, r#"<circle cx="{px}" cy="{py}" r="2.5" fill="{colour}"/>"#);
        }
        let ly = top + 26.0 + k as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 24.0,
            legend_x + 30.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_a_line_per_series_and_the_ceiling() {
        let series =
            |name: &str, dashed| Series { name: name.into(), colour: 0, dashed, values: vec![10.0, 40.0, 50.0] };
        let panels = [Panel {
            title: "host to GPU".into(),
            ceiling: 55.0,
            series: vec![series("auto idle", false), series("auto under load", true)],
        }];
        let svg = render("t <1>", &[4096, 65536, 1 << 20], &panels);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2, "the dashed line and its legend");
        assert!(svg.contains("ceiling 55.0") && svg.contains("t &lt;1&gt;") && svg.contains("64 KiB"));
    }
}
