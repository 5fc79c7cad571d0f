//! Line charts as SVG and PNG (plotters; the PNG text uses an embedded
//! DejaVu Sans Mono, so no system fonts are needed).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed-looking (thin, no markers): a reference level.
    pub reference: bool,
}

impl Series {
    /// A measured line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            reference: false,
        }
    }

    /// A constant reference level across `xs`.
    pub fn level(name: impl Into<String>, y: f64, xs: (f64, f64)) -> Self {
        Self {
            name: name.into(),
            points: vec![(xs.0, y), (xs.1, y)],
            reference: true,
        }
    }
}

/// One chart: a title, axis labels and its lines.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draw `charts` side by side into `stem.svg` and `stem.png`.
pub fn write(stem: &Path, charts: &[Chart]) -> Result<()> {
    register_font();
    let size = (560 * charts.len().max(1) as u32, 420);
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), charts)?;
    let png = stem.with_extension("png");
    draw(BitMapBackend::new(&png, size).into_drawing_area(), charts)?;
    Ok(())
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded and known to parse; a failure would show as missing text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn draw<B: DrawingBackend>(root: DrawingArea<B, Shift>, charts: &[Chart]) -> Result<()> {
    let failed = |e: DrawingAreaErrorKind<B::ErrorType>| anyhow!("drawing a chart: {e}");
    root.fill(&WHITE).map_err(failed)?;
    let panels = root.split_evenly((1, charts.len().max(1)));
    for (panel, chart) in panels.iter().zip(charts) {
        draw_chart(panel, chart).map_err(failed)?;
    }
    root.present().map_err(failed)
}

fn draw_chart<B: DrawingBackend>(
    area: &DrawingArea<B, Shift>,
    chart: &Chart,
) -> Result<(), DrawingAreaErrorKind<B::ErrorType>> {
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = bounds(points().map(|p| p.0));
    let (y0, y1) = bounds(points().map(|p| p.1));
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1, (y0 - pad).max(0.0)..(y1 + pad))?;
    // Rounds (and other whole-number axes) without decimals.
    let whole = points().all(|p| p.0.fract() == 0.0);
    let x_format = |x: &f64| {
        if whole {
            format!("{x:.0}")
        } else {
            format!("{x}")
        }
    };
    let ticks = if whole { (x1 - x0) as usize + 1 } else { 10 };
    ctx.configure_mesh()
        .x_labels(ticks.clamp(2, 10))
        .x_label_formatter(&x_format)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, series) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let style = if series.reference {
            colour.stroke_width(1)
        } else {
            colour.stroke_width(2)
        };
        ctx.draw_series(LineSeries::new(series.points.iter().copied(), style))?
            .label(&series.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
        if !series.reference {
            ctx.draw_series(
                series
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 3, colour.filled())),
            )?;
        }
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()
}

/// The range of `values`, widened when it is a single point.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}
