//! Publication charts: line charts, dot-and-whisker charts of time-to-result
//! per configuration, and performance profiles. Each is written twice, as
//! `<stem>.svg` and `<stem>.png`, atomically (temporary file, then rename).
//!
//! Every chart goes through the same two steps. A *plan* is built from the
//! caller's chart as plain data: axes in drawing units, series, and caption
//! notes. That is where degenerate data is dealt with (non-finite values
//! skipped and counted in the caption, single points and flat series given a
//! non-empty range, a chart without any finite value turned into one that
//! says so), so drawing never meets a value it cannot place. Then one `draw`,
//! generic over the plotters backend, runs once for SVG and once for PNG.
//!
//! Layout rules: the title on top, the legend in its own column right of the
//! plot (so it can never cover data), notes under the plot, label areas
//! sized from the measured width of their text. Colours are the Okabe-Ito
//! palette (distinguishable with the common colour-vision deficiencies) and
//! each series also gets its own marker shape, so a greyscale print still
//! tells them apart.
//!
//! Log axes are drawn as linear axes over `log10` of the data, with ticks
//! chosen here, rather than with plotters' `log_scale()`: that one maps 0 to
//! `-inf`, draws no tick at all on a range inside one decade (its ticks
//! start at a power of the base), and would give each lin/log combination a
//! chart type of its own.
//!
//! Text is drawn with DejaVu Sans, embedded from `assets/` and registered
//! with plotters as "sans-serif": the `ab_glyph` backend has no system fonts
//! and fails to draw any text until a font is registered.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::stats::{PerformanceProfile, MAX_TAU};

/// Default canvas, in pixels for PNG and user units for SVG.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 750;

/// One point of a [`Line`], with an optional interval drawn as a whisker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

/// One series. Points are drawn in order of `x`. `step` draws a step that
/// holds each value until the next point's `x`.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Legend text; an empty label keeps the series out of the legend.
    pub label: String,
    pub points: Vec<Point>,
    pub dashed: bool,
    pub step: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    /// Axis labels, units included (`time-to-result (s)`).
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub lines: Vec<Line>,
    /// Fixed y range; `None` fits the data. Ignored if it is not a finite,
    /// increasing pair (positive on a log axis). Points outside it are drawn
    /// on its edge.
    pub y_range: Option<(f64, f64)>,
}

/// A row of a [`DotChart`]: a dot at `value` with a whisker from `lo` to
/// `hi`. `value = inf` draws a "missed" marker at the right edge; an
/// infinite `hi` draws the whisker open-ended to the right.
#[derive(Debug, Clone, PartialEq)]
pub struct DotRow {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
    /// Printed right of the plot on the row's line (`3/5`).
    pub note: String,
}

/// Rows of labelled dots with whiskers, first row on top, `x` in seconds:
/// time-to-result per configuration with its interval. The canvas is
/// [`WIDTH`] wide and [`HEIGHT`] tall, taller (34 px a row, up to 1500) for
/// many rows; labels longer than 38 % of the width are cut with an ellipsis.
#[derive(Debug, Clone, PartialEq)]
pub struct DotChart {
    pub title: String,
    pub x_label: String,
    pub log_x: bool,
    pub rows: Vec<DotRow>,
}

/// One panel of a [`HeatChart`]: one configuration's grid of values.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatPanel {
    /// Printed above the panel (entry and parameters).
    pub label: String,
    /// `cells[row][col]`; `None` (or a non-finite value) where nothing was
    /// recorded, drawn as a hatched grey cell.
    pub cells: Vec<Vec<Option<f64>>>,
}

/// Small multiples of heat maps on one fixed 0..1 colour scale: one panel
/// per configuration, up to [`HEAT_PER_ROW`] panels a row, the value
/// printed in each cell, a colour bar on the right. The canvas grows with
/// the number of panels and the size of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatChart {
    pub title: String,
    /// Describes the columns (needle depth, %).
    pub x_label: String,
    /// Describes the rows (context length, tokens).
    pub y_label: String,
    /// Row values, drawn top to bottom in this order.
    pub rows: Vec<f64>,
    /// Column values, drawn left to right in this order.
    pub cols: Vec<f64>,
    pub panels: Vec<HeatPanel>,
}

/// Panels per row of a [`HeatChart`].
pub const HEAT_PER_ROW: usize = 4;

/// One marker of a [`ParetoChart`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterPoint {
    /// The whole configuration (`quest budget=0.25`), listed in the caption
    /// when it is on the front.
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// Points sharing a colour and a legend entry (one entry's
/// configurations), joined by a thin line in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterGroup {
    pub label: String,
    pub points: Vec<ScatterPoint>,
}

/// A scatter with its Pareto front drawn dashed through the points that no
/// other point beats on both axes (see [`pareto_front`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ParetoChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub x_higher_better: bool,
    pub y_higher_better: bool,
    pub groups: Vec<ScatterGroup>,
}

/// Writes `chart` to `<stem>.svg` and `<stem>.png` (the extensions are
/// appended, so `spectr-k=4.5` keeps its name; a missing directory is
/// created); returns both paths. A line without a single placeable point
/// stays in the legend, marked "(no finite data)".
pub fn render_line(chart: &LineChart, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    write_figure(&line_plan(chart), stem)
}

/// Writes `chart` to `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn render_dots(chart: &DotChart, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    write_figure(&dot_plan(chart), stem)
}

/// Writes the profile's step curves `rho(tau)` for `tau` in `[1, 4]`, with
/// each method's score `B` in the legend, to `<stem>.svg` and `<stem>.png`.
pub fn render_profile(
    p: &PerformanceProfile,
    title: &str,
    stem: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    write_figure(&profile_plan(p, title), stem)
}

/// Writes the heat-map panels to `<stem>.svg` and `<stem>.png`; returns
/// both paths.
pub fn render_heat(chart: &HeatChart, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    write_figure(&heat_plan(chart), stem)
}

/// Writes the scatter and its Pareto front to `<stem>.svg` and
/// `<stem>.png`; returns both paths.
pub fn render_pareto(chart: &ParetoChart, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    write_figure(&pareto_plan(chart), stem)
}

/// The indices of the non-dominated points, ordered by `x` then `y`
/// (the order the front is drawn in). A point is dominated when another is
/// at least as good on both axes and better on one, "good" meaning higher
/// or lower as the flags say; equal points do not dominate each other, so
/// both stay on the front. Points with a NaN or infinite coordinate take
/// no part: they can be neither drawn nor compared.
pub fn pareto_front(
    points: &[(f64, f64)],
    x_higher_better: bool,
    y_higher_better: bool,
) -> Vec<usize> {
    let sign = |higher: bool| if higher { 1.0 } else { -1.0 };
    let (sx, sy) = (sign(x_higher_better), sign(y_higher_better));
    let dominates = |a: (f64, f64), b: (f64, f64)| {
        let (dx, dy) = (sx * (a.0 - b.0), sy * (a.1 - b.1));
        dx >= 0.0 && dy >= 0.0 && (dx > 0.0 || dy > 0.0)
    };
    let finite: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .collect();
    let mut front: Vec<usize> = finite
        .iter()
        .copied()
        .filter(|&i| !finite.iter().any(|&j| dominates(points[j], points[i])))
        .collect();
    front.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[a].1.total_cmp(&points[b].1))
    });
    front
}

// ---------------------------------------------------------------------------
// Look: sizes in pixels at the default canvas, colours, markers.

const FONT: &str = "sans-serif";
const TITLE_PX: f64 = 30.0;
const AXIS_PX: f64 = 24.0;
const TICK_PX: f64 = 19.0;
const LEGEND_PX: f64 = 19.0;
const CAPTION_PX: f64 = 17.0;
const MARGIN: i32 = 16;
const LINE_W: u32 = 3;
const MARKER_R: i32 = 6;

const INK: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(100, 100, 100);
const GRID: RGBColor = RGBColor(215, 215, 215);
const GRID_MINOR: RGBColor = RGBColor(238, 238, 238);
const MISS_BAND: RGBColor = RGBColor(244, 244, 244);

/// Okabe & Ito, "Color Universal Design" (2008), without the yellow, which
/// is too pale on white for lines.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(0, 0, 0),       // black
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    TriangleDown,
    Cross,
    Plus,
}

/// Six shapes against seven colours: the pair repeats only after 42 series.
const SHAPES: [Shape; 6] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Diamond,
    Shape::TriangleDown,
    Shape::Plus,
];

fn series_look(i: usize) -> (RGBColor, Shape) {
    (PALETTE[i % PALETTE.len()], SHAPES[i % SHAPES.len()])
}

// ---------------------------------------------------------------------------
// Axes.

/// One axis in drawing units (`log10` of the data on a log axis).
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    minor: Vec<f64>,
    /// Fixed decimals for tick labels on a linear axis; `None` formats each
    /// value on its own (log axes).
    decimals: Option<usize>,
}

/// A data value in drawing units, or `None` if it cannot be placed (not
/// finite, or not positive on a log axis).
fn to_axis(log: bool, v: f64) -> Option<f64> {
    if !v.is_finite() {
        None
    } else if log {
        (v > 0.0).then(|| v.log10())
    } else {
        Some(v)
    }
}

impl Axis {
    /// An axis over values already in drawing units (at least one, all
    /// finite), padded by 5 % each side; a single value gets a range around
    /// it.
    fn fit(log: bool, values: impl IntoIterator<Item = f64>) -> Axis {
        let (mut lo, mut hi) = values
            .into_iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            // One value, or all equal: a factor of 2 each side on a log axis,
            // 10 % of the value (or 1 around zero) on a linear one.
            let half = if log {
                std::f64::consts::LOG10_2
            } else if lo == 0.0 {
                1.0
            } else {
                0.1 * lo.abs()
            };
            (lo, hi) = (lo - half, hi + half);
        } else {
            let pad = 0.05 * (hi - lo);
            (lo, hi) = (lo - pad, hi + pad);
        }
        Axis::fixed(log, lo, hi)
    }

    /// An axis over exactly `[lo, hi]` (drawing units, `lo < hi`).
    fn fixed(log: bool, lo: f64, hi: f64) -> Axis {
        let (ticks, minor, decimals) = if log {
            let (t, m) = log_ticks(lo, hi);
            (t, m, None)
        } else {
            let (t, m, d) = linear_ticks(lo, hi);
            (t, m, Some(d))
        };
        Axis {
            log,
            lo,
            hi,
            ticks,
            minor,
            decimals,
        }
    }

    fn label(&self, u: f64) -> String {
        match self.decimals {
            Some(d) => {
                let s = format!("{u:.d$}");
                // "-0.0" reads as a defect.
                if s.trim_start_matches(['-', '0', '.']).is_empty() {
                    s.trim_start_matches('-').to_string()
                } else {
                    s
                }
            }
            None => fmt_number(10f64.powf(u)),
        }
    }

    fn clamp(&self, u: f64) -> f64 {
        u.clamp(self.lo, self.hi)
    }
}

/// plotters draws an [`Axis`] as a linear map with exactly our ticks (bold
/// grid lines and labels) and minor ticks (light grid lines).
impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Ticks at 1, 2, 2.5 or 5 times a power of ten, about six of them; minor
/// ticks between; and the decimals that label every tick exactly.
fn linear_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>, usize) {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let (mult, parts) = [(1.0, 5.0), (2.0, 4.0), (2.5, 5.0), (5.0, 5.0), (10.0, 5.0)]
        .into_iter()
        .find(|(m, _)| m * mag >= raw)
        .unwrap_or((10.0, 5.0));
    let step = mult * mag;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
    let minor_step = step / parts;
    let minor = ((lo / minor_step).ceil() as i64..=(hi / minor_step).floor() as i64)
        .map(|k| k as f64 * minor_step)
        .collect();
    let mut decimals = (-step.log10().floor()).max(0.0) as usize;
    if mult == 2.5 {
        decimals += 1;
    }
    (ticks, minor, decimals)
}

/// Ticks on a log axis, in `log10` units: every decade (thinned to at most
/// eight) when the range holds three or more, else 1-2-5 steps, else round
/// values in data units.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let inside = |u: &f64| *u >= lo - 1e-9 && *u <= hi + 1e-9;
    let (d0, d1) = (lo.ceil() as i32, hi.floor() as i32);
    let decades_in = |mults: &[f64]| -> Vec<f64> {
        ((lo.floor() as i32)..=(hi.ceil() as i32))
            .flat_map(|d| mults.iter().map(move |m| m.log10() + f64::from(d)))
            .filter(inside)
            .collect()
    };
    if d1 - d0 >= 2 {
        let every = ((d1 - d0 + 1) as f64 / 8.0).ceil() as usize;
        let ticks = (d0..=d1).step_by(every).map(f64::from).collect();
        let minor = if every == 1 {
            decades_in(&[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
        } else {
            (d0..=d1).map(f64::from).collect()
        };
        return (ticks, minor);
    }
    let ticks = decades_in(&[1.0, 2.0, 5.0]);
    if ticks.len() >= 3 {
        return (ticks, decades_in(&[3.0, 4.0, 6.0, 7.0, 8.0, 9.0]));
    }
    // Inside a factor of ~3: round values in data units.
    let (t, m, _) = linear_ticks(10f64.powf(lo), 10f64.powf(hi));
    let logs = |v: Vec<f64>| v.into_iter().filter(|x| *x > 0.0).map(f64::log10).collect();
    (logs(t), logs(m))
}

/// A number for a tick or note: up to four significant digits, trailing
/// zeros trimmed, scientific outside `[0.001, 100000)`.
fn fmt_number(v: f64) -> String {
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{e}", trim(m));
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    trim(&format!("{v:.decimals$}")).to_string()
}

// ---------------------------------------------------------------------------
// Plans.

/// A series in drawing units.
#[derive(Debug, Clone, PartialEq)]
struct SeriesPlan {
    label: String,
    look: usize,
    dashed: bool,
    /// What the line goes through (step corners included).
    path: Vec<(f64, f64)>,
    /// Where markers go.
    marks: Vec<(f64, f64)>,
    /// `(x, lo, hi)`; an end that is `None` runs off the axis (open).
    whiskers: Vec<(f64, Option<f64>, Option<f64>)>,
    /// Line width in pixels ([`LINE_W`] but for the thin lines of a scatter).
    width: u32,
    /// Whether the legend sample carries the series marker (a line that
    /// joins markers of other series, like a Pareto front, has none).
    legend_marker: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct XyPlan {
    size: (u32, u32),
    title: String,
    x_label: String,
    y_label: String,
    x: Axis,
    y: Axis,
    series: Vec<SeriesPlan>,
    caption: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum DotMark {
    Dot(f64),
    Missed,
    NoData,
}

#[derive(Debug, Clone, PartialEq)]
struct DotRowPlan {
    label: String,
    note: String,
    mark: DotMark,
    /// Whisker ends in drawing units; `None` for no whisker; an `hi` of
    /// `None` inside `Some` runs into the miss band.
    whisker: Option<(f64, Option<f64>)>,
}

#[derive(Debug, Clone, PartialEq)]
struct DotPlan {
    size: (u32, u32),
    title: String,
    x_label: String,
    x: Axis,
    /// Where the data part of the x axis ends and the "missed" band
    /// begins; equal to `x.hi` when no row needs the band.
    band_lo: f64,
    rows: Vec<DotRowPlan>,
    caption: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct EmptyPlan {
    title: String,
    detail: String,
}

/// A rectangle in pixels: left, top, right, bottom.
type Rect = (i32, i32, i32, i32);

/// One cell of a heat-map panel.
#[derive(Debug, Clone, PartialEq)]
struct HeatCell {
    /// `None`: nothing finite recorded; drawn hatched grey.
    value: Option<f64>,
    fill: RGBColor,
    /// The value as printed (empty for a missing cell).
    text: String,
    /// Colour of the text: white on the dark end of the scale.
    ink: RGBColor,
}

#[derive(Debug, Clone, PartialEq)]
struct HeatPanelPlan {
    label: String,
    /// The cells' area, in pixels.
    grid: Rect,
    /// `cells[row][col]`.
    cells: Vec<Vec<HeatCell>>,
}

#[derive(Debug, Clone, PartialEq)]
struct HeatPlan {
    size: (u32, u32),
    title: String,
    x_label: String,
    y_label: String,
    row_labels: Vec<String>,
    col_labels: Vec<String>,
    /// Width of the row-label column left of each grid.
    row_label_w: i32,
    /// Font size of the column labels (smaller than a tick where wide
    /// labels meet narrow cells).
    col_px: f64,
    /// Cell width and height in pixels.
    cell: (i32, i32),
    /// Font size of the values printed in the cells.
    value_px: f64,
    panels: Vec<HeatPanelPlan>,
    /// The colour bar: 1 at the top, 0 at the bottom.
    bar: Rect,
    /// Whether the legend explains hatched cells.
    any_missing: bool,
    caption: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct ParetoPlan {
    /// The scatter as an x-y chart; its last series is the front.
    xy: XyPlan,
    /// The labels of the configurations on the front, in drawing order.
    front: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Plan {
    Xy(XyPlan),
    Dots(DotPlan),
    Heat(HeatPlan),
    Pareto(ParetoPlan),
    Empty(EmptyPlan),
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn line_plan(chart: &LineChart) -> Plan {
    let mut skipped = 0usize;
    let mut series = Vec::with_capacity(chart.lines.len());
    for (i, line) in chart.lines.iter().enumerate() {
        let mut pts: Vec<(f64, f64, &Point)> = Vec::with_capacity(line.points.len());
        for p in &line.points {
            match (to_axis(chart.log_x, p.x), to_axis(chart.log_y, p.y)) {
                (Some(x), Some(y)) => pts.push((x, y, p)),
                _ => skipped += 1,
            }
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<(f64, f64)> = if line.step {
            let mut path = Vec::with_capacity(2 * pts.len());
            for (k, &(x, y, _)) in pts.iter().enumerate() {
                if k > 0 {
                    path.push((x, pts[k - 1].1));
                }
                path.push((x, y));
            }
            path
        } else {
            pts.iter().map(|&(x, y, _)| (x, y)).collect()
        };
        // Dense lines get every k-th marker: about 30 per line stay legible.
        let every = pts.len().div_ceil(30).max(1);
        let marks = pts.iter().step_by(every).map(|&(x, y, _)| (x, y)).collect();
        let whiskers = pts
            .iter()
            .filter(|(_, _, p)| p.lo.is_some() || p.hi.is_some())
            .filter_map(|&(x, y, p)| {
                // An absent (or NaN) end stops at the point; an end that
                // cannot be placed (infinite, or not positive on a log
                // axis) runs off the axis.
                let end = |v: Option<f64>| match v {
                    Some(v) if !v.is_nan() => to_axis(chart.log_y, v),
                    _ => Some(y),
                };
                let (lo, hi) = (end(p.lo), end(p.hi));
                (lo != Some(y) || hi != Some(y)).then_some((x, lo, hi))
            })
            .collect();
        let label = if line.label.is_empty() || !pts.is_empty() {
            line.label.clone()
        } else {
            format!("{} (no finite data)", line.label)
        };
        series.push(SeriesPlan {
            label,
            look: i,
            dashed: line.dashed,
            path,
            marks,
            whiskers,
            width: LINE_W,
            legend_marker: true,
        });
    }
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.path.iter().map(|p| p.0))
        .collect();
    if xs.is_empty() {
        let log = if chart.log_x || chart.log_y {
            " and positive on the log axis"
        } else {
            ""
        };
        return Plan::Empty(EmptyPlan {
            title: chart.title.clone(),
            detail: if skipped == 0 {
                "no points to draw".into()
            } else {
                format!(
                    "none of the {} is finite{log}",
                    plural(skipped, "point", "points")
                )
            },
        });
    }
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| {
            s.path.iter().map(|p| p.1).chain(
                s.whiskers
                    .iter()
                    .flat_map(|&(_, lo, hi)| lo.into_iter().chain(hi)),
            )
        })
        .collect();
    let x = Axis::fit(chart.log_x, xs);
    let fixed_y = chart.y_range.and_then(|(lo, hi)| {
        let (lo, hi) = (to_axis(chart.log_y, lo)?, to_axis(chart.log_y, hi)?);
        (lo < hi).then(|| Axis::fixed(chart.log_y, lo, hi))
    });
    let y = fixed_y.unwrap_or_else(|| Axis::fit(chart.log_y, ys));
    let mut caption = Vec::new();
    if skipped > 0 {
        caption.push(format!(
            "{} not drawn: not finite{}.",
            plural(skipped, "point", "points"),
            if chart.log_x || chart.log_y {
                ", or not positive on a log axis"
            } else {
                ""
            }
        ));
    }
    Plan::Xy(XyPlan {
        size: (WIDTH, HEIGHT),
        title: chart.title.clone(),
        x_label: chart.x_label.clone(),
        y_label: chart.y_label.clone(),
        x,
        y,
        series,
        caption,
    })
}

fn profile_plan(p: &PerformanceProfile, title: &str) -> Plan {
    if p.methods.is_empty() {
        return Plan::Empty(EmptyPlan {
            title: title.into(),
            detail: "no methods to profile".into(),
        });
    }
    let series = p
        .ratios
        .iter()
        .enumerate()
        .map(|(m, ratios)| {
            let n = ratios.len().max(1) as f64;
            let mut solved: Vec<f64> = ratios.iter().copied().filter(|r| *r <= MAX_TAU).collect();
            solved.sort_by(f64::total_cmp);
            // The exact step function: rho jumps at each ratio.
            let mut count = solved.iter().take_while(|r| **r <= 1.0).count();
            let mut path = vec![(1.0, count as f64 / n)];
            let mut marks = vec![(1.0, count as f64 / n)];
            while count < solved.len() {
                let r = solved[count];
                let before = count as f64 / n;
                while count < solved.len() && solved[count] == r {
                    count += 1;
                }
                let after = count as f64 / n;
                path.push((r, before));
                path.push((r, after));
                marks.push((r, after));
            }
            path.push((MAX_TAU, count as f64 / n));
            let score = p.score.get(m).copied().unwrap_or(f64::NAN);
            SeriesPlan {
                label: format!("{}  (B = {score:.3})", p.methods[m]),
                look: m,
                dashed: false,
                path,
                marks,
                whiskers: Vec::new(),
                width: LINE_W,
                legend_marker: true,
            }
        })
        .collect();
    let mut x = Axis::fixed(false, 1.0, MAX_TAU);
    x.ticks = vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0];
    x.decimals = Some(1);
    let mut y = Axis::fixed(false, -0.03, 1.03);
    y.ticks = vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
    y.minor = (0..=20).map(|k| f64::from(k) * 0.05).collect();
    y.decimals = Some(1);
    Plan::Xy(XyPlan {
        size: (WIDTH, HEIGHT),
        title: title.into(),
        x_label: "τ: time over the fastest method's time on the problem".into(),
        y_label: "ρ(τ): share of problems solved within τ".into(),
        x,
        y,
        series,
        caption: vec![format!(
            "{} problems. B = area under ρ(τ) for τ in [1, {MAX_TAU}], over {}; \
             a time more than {MAX_TAU}× the fastest counts as a miss.",
            p.problems.len(),
            MAX_TAU - 1.0
        )],
    })
}

fn dot_plan(chart: &DotChart) -> Plan {
    let log = chart.log_x;
    let place = |v: f64| to_axis(log, v);
    let mut finite: Vec<f64> = Vec::new();
    let mut needs_band = false;
    let rows: Vec<DotRowPlan> = chart
        .rows
        .iter()
        .map(|r| {
            let mark = if r.value == f64::INFINITY {
                needs_band = true;
                DotMark::Missed
            } else if let Some(v) = place(r.value) {
                finite.push(v);
                DotMark::Dot(v)
            } else {
                DotMark::NoData
            };
            let lo = place(r.lo);
            // Some(Some(u)): a bound to draw; Some(None): an infinite bound,
            // the whisker runs into the band; None: nothing usable.
            let hi = if r.hi == f64::INFINITY {
                Some(None)
            } else {
                place(r.hi).map(Some)
            };
            finite.extend(lo);
            finite.extend(hi.flatten());
            let whisker = match (lo, hi, &mark) {
                (Some(lo), Some(hi), _) => Some((lo, hi)),
                // A miss with a finite lower bound but no usable upper one:
                // run from it into the band.
                (Some(lo), None, DotMark::Missed) => Some((lo, None)),
                _ => None,
            };
            if matches!(whisker, Some((_, None))) {
                needs_band = true;
            }
            DotRowPlan {
                label: r.label.clone(),
                note: r.note.clone(),
                mark,
                whisker,
            }
        })
        .collect();
    if finite.is_empty() {
        let missed = rows.iter().filter(|r| r.mark == DotMark::Missed).count();
        return Plan::Empty(EmptyPlan {
            title: chart.title.clone(),
            detail: if chart.rows.is_empty() {
                "no rows".into()
            } else if missed == chart.rows.len() {
                format!("{}, every one missed", plural(missed, "row", "rows"))
            } else {
                format!(
                    "{}, none with a finite value",
                    plural(chart.rows.len(), "row", "rows")
                )
            },
        });
    }
    let data = Axis::fit(log, finite.iter().copied());
    let (x, band_lo) = if needs_band {
        // The band takes the right 15 % of the axis.
        let band = (data.hi - data.lo) * 0.15 / 0.85;
        let mut x = Axis::fixed(log, data.lo, data.hi + band);
        x.ticks = data.ticks.clone();
        x.minor = data.minor.clone();
        (x, data.hi)
    } else {
        let hi = data.hi;
        (data, hi)
    };
    let no_data = rows.iter().filter(|r| r.mark == DotMark::NoData).count();
    let mut caption = Vec::new();
    if no_data > 0 {
        caption.push(format!(
            "{} without a finite{} value.",
            plural(no_data, "row", "rows"),
            if log { ", positive" } else { "" }
        ));
    }
    let rows_px = 34 * rows.len() as u32 + 230;
    Plan::Dots(DotPlan {
        size: (WIDTH, rows_px.clamp(HEIGHT, 1500)),
        title: chart.title.clone(),
        x_label: chart.x_label.clone(),
        x,
        band_lo,
        rows,
        caption,
    })
}

/// Viridis (van der Walt & Smith, matplotlib), sampled at tenths: a
/// sequential scale that is perceptually uniform, readable with the common
/// colour-vision deficiencies and monotone in lightness, so greyscale keeps
/// the order.
const VIRIDIS: [RGBColor; 11] = [
    RGBColor(68, 1, 84),
    RGBColor(72, 36, 117),
    RGBColor(65, 68, 135),
    RGBColor(53, 95, 141),
    RGBColor(42, 120, 142),
    RGBColor(33, 145, 140),
    RGBColor(34, 168, 132),
    RGBColor(68, 191, 112),
    RGBColor(122, 209, 81),
    RGBColor(189, 223, 38),
    RGBColor(253, 231, 37),
];
const MISSING_CELL: RGBColor = RGBColor(238, 238, 238);
const MISSING_HATCH: RGBColor = RGBColor(190, 190, 190);

/// The colour of `v` on the fixed 0..1 scale; values outside take the
/// nearer end.
fn heat_colour(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f64;
    let k = (t.floor() as usize).min(VIRIDIS.len() - 2);
    let f = t - k as f64;
    let (a, b) = (VIRIDIS[k], VIRIDIS[k + 1]);
    let mix = |a: u8, b: u8| (f64::from(a) + f * (f64::from(b) - f64::from(a))).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Rough lightness of a colour (Rec. 709 weights on the stored values),
/// enough to choose black or white text on it.
fn lightness(c: RGBColor) -> f64 {
    (0.2126 * f64::from(c.0) + 0.7152 * f64::from(c.1) + 0.0722 * f64::from(c.2)) / 255.0
}

/// A cell's value as printed: two decimals on the scale, else as a tick.
fn heat_text(v: f64) -> String {
    if (0.0..=1.0).contains(&v) {
        format!("{v:.2}")
    } else {
        fmt_number(v)
    }
}

/// Text width for layout before any backend exists: DejaVu Sans digits are
/// 0.636 em wide, and most letters narrower.
fn estimate_width(s: &str, px: f64) -> i32 {
    (s.chars().count() as f64 * px * 0.64).ceil() as i32
}

/// Diagonal hatching of `rect` (lines `x + y = k`, `step` pixels apart),
/// each segment clipped to the rectangle.
fn hatch((x0, y0, x1, y1): Rect, step: i32) -> Vec<[(i32, i32); 2]> {
    let step = step.max(1);
    (1..)
        .map(|i| x0 + y0 + i * step)
        .take_while(|&k| k < x1 + y1)
        .map(|k| {
            let (xa, xb) = ((k - y1).max(x0), (k - y0).min(x1));
            [(xa, k - xa), (xb, k - xb)]
        })
        .collect()
}

fn heat_plan(chart: &HeatChart) -> Plan {
    let (nr, nc, np) = (chart.rows.len(), chart.cols.len(), chart.panels.len());
    let empty = |detail: String| {
        Plan::Empty(EmptyPlan {
            title: chart.title.clone(),
            detail,
        })
    };
    if np == 0 {
        return empty("no configurations".into());
    }
    if nr == 0 || nc == 0 {
        return empty("no rows or no columns".into());
    }
    let cells: Vec<Vec<Vec<HeatCell>>> = chart
        .panels
        .iter()
        .map(|p| {
            (0..nr)
                .map(|r| {
                    (0..nc)
                        .map(|c| {
                            let v = p.cells.get(r).and_then(|row| row.get(c)).copied();
                            match v.flatten().filter(|v| v.is_finite()) {
                                Some(v) => {
                                    let fill = heat_colour(v);
                                    HeatCell {
                                        value: Some(v),
                                        fill,
                                        text: heat_text(v),
                                        ink: if lightness(fill) < 0.5 { WHITE } else { INK },
                                    }
                                }
                                None => HeatCell {
                                    value: None,
                                    fill: MISSING_CELL,
                                    text: String::new(),
                                    ink: MUTED,
                                },
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let all = || cells.iter().flatten().flatten();
    let total = np * nr * nc;
    let missing = all().filter(|c| c.value.is_none()).count();
    let outside = all()
        .filter(|c| c.value.is_some_and(|v| !(0.0..=1.0).contains(&v)))
        .count();
    if missing == total {
        return empty(format!(
            "none of the {} has a finite value",
            plural(total, "cell", "cells")
        ));
    }

    // Cells: the grid about 300 x 240 px, each cell wide enough for its
    // longest value at 11 px.
    let longest = all().map(|c| c.text.chars().count()).max().unwrap_or(4);
    let cell_w = (300 / nc as i32)
        .clamp(40, 96)
        .max(estimate_width(&"0".repeat(longest), 11.0) + 8);
    let cell_h = (240 / nr as i32).clamp(26, 56);
    let value_px = 16f64
        .min(f64::from(cell_h) * 0.5)
        .min(f64::from(cell_w - 8) / (longest as f64 * 0.64));
    let row_labels: Vec<String> = chart.rows.iter().map(|&v| fmt_number(v)).collect();
    let col_labels: Vec<String> = chart.cols.iter().map(|&v| fmt_number(v)).collect();
    let col_chars = col_labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(1);
    let col_px = TICK_PX.min(f64::from(cell_w - 4) / (col_chars as f64 * 0.64));
    let row_label_w = row_labels
        .iter()
        .map(|l| estimate_width(l, TICK_PX))
        .max()
        .unwrap_or(0)
        + 12;

    let mut caption =
        vec!["Each cell prints its value, coloured on a fixed 0 to 1 scale.".to_string()];
    if missing > 0 {
        caption.push(format!(
            "Hatched grey cells: no finite value recorded ({missing} of {total})."
        ));
    }
    if outside > 0 {
        caption.push(format!(
            "{} outside 0 to 1, coloured as the nearer end of the scale.",
            plural(outside, "cell", "cells")
        ));
    }

    const GAP_X: i32 = 30;
    const GAP_Y: i32 = 20;
    const BAR_W: i32 = 24;
    const LEGEND_W: i32 = 140;
    let title_h = TITLE_PX as i32 + 30;
    let left = MARGIN + AXIS_PX as i32 + 18;
    let label_h = LEGEND_PX as i32 + 14;
    let tick_h = TICK_PX as i32 + 12;
    let (grid_w, grid_h) = (nc as i32 * cell_w, nr as i32 * cell_h);
    let (panel_w, panel_h) = (row_label_w + grid_w, label_h + grid_h + tick_h);
    let per_row = np.min(HEAT_PER_ROW);
    let panel_rows = np.div_ceil(per_row);
    let content_w = per_row as i32 * (panel_w + GAP_X) - GAP_X;
    let panels_h = panel_rows as i32 * (panel_h + GAP_Y) - GAP_Y;
    let bar_h = (panels_h - label_h - tick_h).clamp(160, 360);
    let legend_h = bar_h + if missing > 0 { 60 } else { 16 };
    let body_h = panels_h.max(label_h + legend_h);
    let x_label_h = AXIS_PX as i32 + 24;
    let caption_h = (CAPTION_PX as i32 + 8) * caption.len() as i32 + 14;
    let needed_w = left + content_w + GAP_X + LEGEND_W + MARGIN;
    let width = needed_w.max(720);
    let height = title_h + body_h + x_label_h + caption_h + MARGIN;
    let x0 = left + (width - needed_w) / 2;

    let panels = chart
        .panels
        .iter()
        .zip(cells)
        .enumerate()
        .map(|(k, (p, cells))| {
            let (col, row) = ((k % per_row) as i32, (k / per_row) as i32);
            let gx = x0 + col * (panel_w + GAP_X) + row_label_w;
            let gy = title_h + row * (panel_h + GAP_Y) + label_h;
            HeatPanelPlan {
                label: p.label.clone(),
                grid: (gx, gy, gx + grid_w, gy + grid_h),
                cells,
            }
        })
        .collect();
    let bx = x0 + content_w + GAP_X;
    Plan::Heat(HeatPlan {
        size: (width as u32, height as u32),
        title: chart.title.clone(),
        x_label: chart.x_label.clone(),
        y_label: chart.y_label.clone(),
        row_labels,
        col_labels,
        row_label_w,
        col_px,
        cell: (cell_w, cell_h),
        value_px,
        panels,
        bar: (bx, title_h + label_h, bx + BAR_W, title_h + label_h + bar_h),
        any_missing: missing > 0,
        caption,
    })
}

/// The front is drawn in black, which the groups never get.
const FRONT_LOOK: usize = 6;
/// Width of the thin lines that join one entry's configurations (in the
/// PNG, 2 px would come out as wide as [`LINE_W`]; see [`draw_polyline`]).
const SCATTER_LINE_W: u32 = 1;

/// The look of the `i`-th group of a scatter: every colour but black.
fn group_look(i: usize) -> usize {
    i + i / (PALETTE.len() - 1)
}

fn pareto_plan(chart: &ParetoChart) -> Plan {
    let mut skipped = 0usize;
    let mut placed: Vec<(f64, f64)> = Vec::new();
    let mut labels: Vec<&str> = Vec::new();
    let mut series = Vec::with_capacity(chart.groups.len() + 1);
    for (i, g) in chart.groups.iter().enumerate() {
        let mut pts = Vec::with_capacity(g.points.len());
        for p in &g.points {
            match (to_axis(chart.log_x, p.x), to_axis(chart.log_y, p.y)) {
                (Some(x), Some(y)) => {
                    pts.push((x, y));
                    placed.push((x, y));
                    labels.push(&p.label);
                }
                _ => skipped += 1,
            }
        }
        series.push(SeriesPlan {
            label: if pts.is_empty() {
                format!("{} (no finite data)", g.label)
            } else {
                g.label.clone()
            },
            look: group_look(i),
            dashed: false,
            path: pts.clone(),
            marks: pts,
            whiskers: Vec::new(),
            width: SCATTER_LINE_W,
            legend_marker: true,
        });
    }
    let log = if chart.log_x || chart.log_y {
        ", or not positive on a log axis"
    } else {
        ""
    };
    if placed.is_empty() {
        return Plan::Empty(EmptyPlan {
            title: chart.title.clone(),
            detail: if skipped == 0 {
                "no configurations to draw".into()
            } else {
                format!(
                    "none of the {} has a finite x and y{log}",
                    plural(skipped, "configuration", "configurations")
                )
            },
        });
    }
    // log10 is increasing, so dominance in drawing units is dominance in
    // the data.
    let front = pareto_front(&placed, chart.x_higher_better, chart.y_higher_better);
    series.push(SeriesPlan {
        label: "Pareto front".into(),
        look: FRONT_LOOK,
        dashed: true,
        path: front.iter().map(|&i| placed[i]).collect(),
        marks: Vec::new(),
        whiskers: Vec::new(),
        width: LINE_W,
        legend_marker: false,
    });
    let front: Vec<String> = front.iter().map(|&i| labels[i].to_string()).collect();
    let better = |higher: bool| if higher { "higher" } else { "lower" };
    let mut caption = vec![
        format!(
            "Pareto front (dashed): configurations that no other matches or beats on both axes \
             ({} x and {} y are better).",
            better(chart.x_higher_better),
            better(chart.y_higher_better)
        ),
        format!("On the front: {}.", front.join(", ")),
    ];
    if skipped > 0 {
        caption.push(format!(
            "{} not drawn: no finite x and y{log}.",
            plural(skipped, "configuration", "configurations")
        ));
    }
    Plan::Pareto(ParetoPlan {
        xy: XyPlan {
            size: (WIDTH, HEIGHT),
            title: chart.title.clone(),
            x_label: chart.x_label.clone(),
            y_label: chart.y_label.clone(),
            x: Axis::fit(chart.log_x, placed.iter().map(|p| p.0)),
            y: Axis::fit(chart.log_y, placed.iter().map(|p| p.1)),
            series,
            caption,
        },
        front,
    })
}

// ---------------------------------------------------------------------------
// Drawing.

/// Drawing errors carry a backend-specific type; turn them into text.
trait Plotted<T> {
    fn plot(self) -> anyhow::Result<T>;
}

impl<T, E: std::fmt::Display> Plotted<T> for Result<T, E> {
    fn plot(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow!("drawing the chart failed: {e}"))
    }
}

fn font(px: f64) -> FontDesc<'static> {
    (FONT, px).into_font()
}

fn text_style(px: f64, color: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(px).color(&color).pos(Pos::new(h, v))
}

fn text_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, s: &str, px: f64) -> i32 {
    area.estimate_text_size(s, &TextStyle::from(font(px)))
        .map(|(w, _)| w as i32)
        // Only reached if the font failed, which drawing would report.
        .unwrap_or((s.chars().count() as f64 * px * 0.6) as i32)
}

/// `s` cut with an ellipsis to fit `max_w` pixels.
fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    px: f64,
    max_w: i32,
) -> String {
    if text_width(area, s, px) <= max_w {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut keep = chars.len();
    while keep > 1 {
        keep -= 1;
        let cut: String = chars[..keep].iter().collect::<String>() + "…";
        if text_width(area, &cut, px) <= max_w {
            return cut;
        }
    }
    "…".into()
}

fn draw_text<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &str,
    at: (i32, i32),
    style: &TextStyle<'_>,
) -> anyhow::Result<()> {
    if s.is_empty() {
        return Ok(());
    }
    let at = match style.pos.v_pos {
        VPos::Center => (at.0, at.1 + centre_nudge(style.font.get_size())),
        _ => at,
    };
    root.draw(&Text::new(s.to_string(), at, style.clone()))
        .plot()
}

/// How far to move vertically centred text down so that its capitals sit
/// on the anchor. plotters centres the layout box, not the glyphs: in the
/// PNG (ab_glyph) capitals land about 0.2 em above the anchor, in the SVG
/// (`dy="0.5ex"`) about 0.1 em above; 0.12 em splits the difference.
fn centre_nudge(px: f64) -> i32 {
    (0.12 * px).round() as i32
}

/// Draws the title centred on top, shrinking it to fit the width (and
/// cutting it if even 18 px is too wide); returns the area below.
fn draw_title<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> anyhow::Result<DrawingArea<DB, Shift>> {
    let (w, _) = root.dim_in_pixel();
    let max_w = w as i32 - 2 * MARGIN;
    let mut px = TITLE_PX;
    while px > 18.0 && text_width(root, title, px) > max_w {
        px -= 1.0;
    }
    let title = fit_text(root, title, px, max_w);
    draw_text(
        root,
        &title,
        (w as i32 / 2, 14),
        &text_style(px, INK, HPos::Center, VPos::Top),
    )?;
    Ok(root.split_vertically(TITLE_PX as i32 + 30).1)
}

/// Splits off a caption strip at the bottom and writes `lines` into it.
fn draw_caption<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: DrawingArea<DB, Shift>,
    lines: &[String],
) -> anyhow::Result<DrawingArea<DB, Shift>> {
    if lines.is_empty() {
        return Ok(area);
    }
    let line_h = CAPTION_PX as i32 + 8;
    let (_, h) = area.dim_in_pixel();
    let (body, strip) = area.split_vertically(h as i32 - line_h * lines.len() as i32 - 14);
    let (x0, y0) = strip.get_base_pixel();
    let (w, _) = root.dim_in_pixel();
    for (k, line) in lines.iter().enumerate() {
        let line = fit_text(root, line, CAPTION_PX, w as i32 - 2 * MARGIN);
        draw_text(
            root,
            &line,
            (x0 + MARGIN, y0 + 6 + k as i32 * line_h),
            &text_style(CAPTION_PX, MUTED, HPos::Left, VPos::Top),
        )?;
    }
    Ok(body)
}

fn draw_marker<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    shape: Shape,
    color: RGBColor,
    r: i32,
) -> anyhow::Result<()> {
    let fill = color.filled();
    let stroke = color.stroke_width(3);
    // A thin white rim keeps a marker readable where lines cross it.
    let rim = WHITE.stroke_width(1);
    match shape {
        Shape::Circle => {
            root.draw(&Circle::new((x, y), r + 1, WHITE.filled()))
                .plot()?;
            root.draw(&Circle::new((x, y), r, fill)).plot()
        }
        Shape::Square => {
            let s = r - 1;
            root.draw(&Rectangle::new([(x - s, y - s), (x + s, y + s)], fill))
                .plot()?;
            root.draw(&Rectangle::new([(x - s, y - s), (x + s, y + s)], rim))
                .plot()
        }
        Shape::Triangle | Shape::TriangleDown | Shape::Diamond => {
            let d = if shape == Shape::TriangleDown { -1 } else { 1 };
            let pts = match shape {
                Shape::Diamond => vec![
                    (x, y - r - 2),
                    (x + r + 1, y),
                    (x, y + r + 2),
                    (x - r - 1, y),
                ],
                _ => vec![
                    (x, y - d * (r + 2)),
                    (x + r + 1, y + d * (r - 1)),
                    (x - r - 1, y + d * (r - 1)),
                ],
            };
            root.draw(&Polygon::new(pts, fill)).plot()
        }
        Shape::Cross | Shape::Plus => {
            let segs = if shape == Shape::Cross {
                [
                    [(x - r, y - r), (x + r, y + r)],
                    [(x - r, y + r), (x + r, y - r)],
                ]
            } else {
                [
                    [(x - r - 1, y), (x + r + 1, y)],
                    [(x, y - r - 1), (x, y + r + 1)],
                ]
            };
            for seg in segs {
                root.draw(&PathElement::new(seg.to_vec(), stroke)).plot()?;
            }
            Ok(())
        }
    }
}

/// A horizontal line sample `len` pixels long starting at `(x, y)`, dashed
/// like the series (same pattern as [`dashes`]), with the series marker of
/// radius `r` in its middle unless the series has none in the legend.
fn draw_sample<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    len: i32,
    s: &SeriesPlan,
    r: i32,
) -> anyhow::Result<()> {
    let (color, shape) = series_look(s.look);
    let style = color.stroke_width(s.width);
    let line = vec![(x, y), (x + len, y)];
    let pieces = if s.dashed {
        dashes(&line, 12.0, 8.0)
    } else {
        vec![line]
    };
    for piece in pieces {
        root.draw(&PathElement::new(piece, style)).plot()?;
    }
    if !s.legend_marker {
        return Ok(());
    }
    draw_marker(root, (x + len / 2, y), shape, color, r)
}

/// A thick polyline. plotters rasterises a thick path as a polygon whose
/// vertices it truncates to whole pixels, so a curve made of short segments
/// comes out 2 or 3 px wide by turns, with notches at the joints. In the
/// PNG each segment is instead drawn with a square brush of 1 px
/// anti-aliased lines, with a disc at each joint; the SVG keeps one
/// polyline, which viewers stroke properly.
fn draw_polyline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    path: Vec<(i32, i32)>,
    style: ShapeStyle,
    raster: bool,
) -> anyhow::Result<()> {
    if !raster || style.stroke_width <= 1 {
        return root.draw(&PathElement::new(path, style)).plot();
    }
    let half = (style.stroke_width / 2) as i32;
    let thin = style.color.stroke_width(1);
    for w in path.windows(2) {
        let ((ax, ay), (bx, by)) = (w[0], w[1]);
        // A square brush: uniform width whatever the slope (a brush across
        // the main direction alone leaves 45-degree lines a third thinner).
        for dx in -half..=half {
            for dy in -half..=half {
                root.draw(&PathElement::new(
                    vec![(ax + dx, ay + dy), (bx + dx, by + dy)],
                    thin,
                ))
                .plot()?;
            }
        }
    }
    for &p in &path[1..path.len() - 1] {
        root.draw(&Circle::new(p, half, style.color.filled()))
            .plot()?;
    }
    Ok(())
}

/// Ramer-Douglas-Peucker: the fewest points of `path` that stay within
/// `eps` pixels of it. Keeps both ends and every corner that matters.
fn simplify(path: &[(i32, i32)], eps: f64) -> Vec<(i32, i32)> {
    let mut path = path.to_vec();
    path.dedup();
    if path.len() <= 2 {
        return path;
    }
    let f = |p: (i32, i32)| (f64::from(p.0), f64::from(p.1));
    let mut keep = vec![false; path.len()];
    let last = path.len() - 1;
    keep[0] = true;
    keep[last] = true;
    let mut stack = vec![(0, last)];
    while let Some((a, b)) = stack.pop() {
        let ((ax, ay), (bx, by)) = (f(path[a]), f(path[b]));
        let (dx, dy) = (bx - ax, by - ay);
        let len = dx.hypot(dy);
        let far = (a + 1..b)
            .map(|i| {
                let (px, py) = f(path[i]);
                let d = if len == 0.0 {
                    (px - ax).hypot(py - ay)
                } else {
                    ((px - ax) * dy - (py - ay) * dx).abs() / len
                };
                (i, d)
            })
            .max_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((i, d)) = far {
            if d > eps {
                keep[i] = true;
                stack.push((a, i));
                stack.push((i, b));
            }
        }
    }
    path.into_iter()
        .zip(keep)
        .filter_map(|(p, k)| k.then_some(p))
        .collect()
}

/// `path` cut into dashes `on` pixels long with `off`-pixel gaps, the
/// pattern carrying on across corners.
fn dashes(path: &[(i32, i32)], on: f64, off: f64) -> Vec<Vec<(i32, i32)>> {
    let mut out = Vec::new();
    let mut current: Vec<(i32, i32)> = Vec::new();
    let mut drawing = true;
    let mut left = on;
    let round = |x: f64, y: f64| (x.round() as i32, y.round() as i32);
    for w in path.windows(2) {
        let (ax, ay) = (f64::from(w[0].0), f64::from(w[0].1));
        let (bx, by) = (f64::from(w[1].0), f64::from(w[1].1));
        let len = (bx - ax).hypot(by - ay);
        let mut t = 0.0;
        if drawing && current.is_empty() {
            current.push(w[0]);
        }
        while len - t > left {
            t += left;
            let p = round(ax + (bx - ax) * t / len, ay + (by - ay) * t / len);
            if drawing {
                current.push(p);
                out.push(std::mem::take(&mut current));
            } else {
                current = vec![p];
            }
            drawing = !drawing;
            left = if drawing { on } else { off };
        }
        left -= len - t;
        if drawing {
            current.push(w[1]);
        }
    }
    if current.len() >= 2 {
        out.push(current);
    }
    out
}

type Coords = Cartesian2d<Axis, Axis>;

/// The part of a chart both kinds share: the mesh with its labels.
fn draw_mesh<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Coords>,
    x: &Axis,
    y: &Axis,
    x_label: &str,
    y_label: &str,
    y_label_fmt: Option<&dyn Fn(&f64) -> String>,
    y_label_px: f64,
) -> anyhow::Result<()> {
    let x_fmt = |u: &f64| x.label(*u);
    let y_fmt = |u: &f64| y.label(*u);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .axis_desc_style(font(AXIS_PX).color(&INK))
        .x_label_style(font(TICK_PX).color(&INK))
        .y_label_style(font(y_label_px).color(&INK))
        .x_label_formatter(&x_fmt)
        .y_label_formatter(y_label_fmt.unwrap_or(&y_fmt))
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(GRID_MINOR.stroke_width(1))
        .axis_style(INK.stroke_width(1))
        .y_label_offset(centre_nudge(y_label_px))
        .set_all_tick_mark_size(6);
    if !y_label.is_empty() {
        mesh.y_desc(y_label);
    }
    mesh.draw().plot()
}

impl XyPlan {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        raster: bool,
    ) -> anyhow::Result<()> {
        let body = draw_title(root, &self.title)?;
        let body = draw_caption(root, body, &self.caption)?;
        let (w, _) = root.dim_in_pixel();

        // Legend column: as wide as its longest label, at most 36 % of the
        // width (longer labels are cut with an ellipsis).
        const SAMPLE: i32 = 46;
        const PAD: i32 = 14;
        let max_label_w = (w as f64 * 0.36) as i32 - SAMPLE - 3 * PAD;
        let entries: Vec<(String, &SeriesPlan)> = self
            .series
            .iter()
            .filter(|s| !s.label.is_empty())
            .map(|s| (fit_text(root, &s.label, LEGEND_PX, max_label_w), s))
            .collect();
        let box_w = entries
            .iter()
            .map(|(l, _)| text_width(root, l, LEGEND_PX))
            .max()
            .map_or(0, |lw| lw + SAMPLE + 3 * PAD);
        let legend_w = if box_w > 0 { box_w + 2 * MARGIN } else { 0 };
        let (bw, _) = body.dim_in_pixel();
        let (plot_area, legend_area) = body.split_horizontally(bw as i32 - legend_w);

        let tick_w = |axis: &Axis, t: f64| text_width(root, &axis.label(t), TICK_PX);
        let y_tick_w = self
            .y
            .ticks
            .iter()
            .map(|&t| tick_w(&self.y, t))
            .max()
            .unwrap_or(0);
        let x_last_w = self.x.ticks.last().map_or(0, |&t| tick_w(&self.x, t));
        let mut chart = ChartBuilder::on(&plot_area)
            .margin_top(8)
            .margin_bottom(4)
            .margin_left(MARGIN)
            .margin_right(MARGIN.max(x_last_w / 2 + 6))
            .x_label_area_size(TICK_PX as i32 + AXIS_PX as i32 + 34)
            .y_label_area_size(y_tick_w + AXIS_PX as i32 + 34)
            .build_cartesian_2d(self.x.clone(), self.y.clone())
            .plot()?;
        draw_mesh(
            &mut chart,
            &self.x,
            &self.y,
            &self.x_label,
            &self.y_label,
            None,
            TICK_PX,
        )?;

        let area = chart.plotting_area().clone();
        let px = |(x, y): (f64, f64)| area.map_coordinate(&(self.x.clamp(x), self.y.clamp(y)));
        for s in &self.series {
            let (color, shape) = series_look(s.look);
            let style = color.stroke_width(s.width);
            // Lines are drawn in pixels, simplified first: thousands of
            // sub-pixel segments drawn 3 px wide come out ragged in the PNG
            // and bloat the SVG.
            let path: Vec<(i32, i32)> = s.path.iter().map(|&p| px(p)).collect();
            let path = simplify(&path, 0.5);
            let pieces = if s.dashed {
                dashes(&path, 12.0, 8.0)
            } else {
                vec![path]
            };
            for piece in pieces.into_iter().filter(|p| p.len() >= 2) {
                draw_polyline(root, piece, style, raster)?;
            }
            let thin = color.stroke_width(2);
            for &(x, lo, hi) in &s.whiskers {
                let top = px((x, hi.unwrap_or(self.y.hi)));
                let bottom = px((x, lo.unwrap_or(self.y.lo)));
                root.draw(&PathElement::new(vec![top, bottom], thin))
                    .plot()?;
                for (end, open, dir) in [(top, hi.is_none(), -1), (bottom, lo.is_none(), 1)] {
                    let (cx, cy) = end;
                    let cap = if open {
                        // Arrowhead: the interval runs off the axis.
                        vec![(cx - 5, cy - dir * 7), (cx, cy), (cx + 5, cy - dir * 7)]
                    } else {
                        vec![(cx - 6, cy), (cx + 6, cy)]
                    };
                    root.draw(&PathElement::new(cap, thin)).plot()?;
                }
            }
            for &m in &s.marks {
                draw_marker(root, px(m), shape, color, MARKER_R)?;
            }
        }

        if !entries.is_empty() {
            const MIN_ROW: i32 = 14;
            let (_, yr) = area.get_pixel_range();
            let x0 = legend_area.get_base_pixel().0 + MARGIN;
            // Rows shrink to fit the plot's height; past 14 px the last row
            // says how many series the legend leaves out.
            let fits = ((yr.end - yr.start - 2 * PAD) / MIN_ROW).max(1) as usize;
            let (shown, left_out) = if entries.len() > fits {
                (fits - 1, entries.len() - (fits - 1))
            } else {
                (entries.len(), 0)
            };
            let rows = shown + usize::from(left_out > 0);
            let row_h = ((yr.end - yr.start - 2 * PAD) / rows as i32).clamp(MIN_ROW, 32);
            let text_px = LEGEND_PX.min(f64::from(row_h) * 0.8);
            let box_h = row_h * rows as i32 + 2 * PAD - (row_h - text_px as i32) / 2;
            let y0 = yr.start;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + box_w, y0 + box_h)],
                WHITE.filled(),
            ))
            .plot()?;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + box_w, y0 + box_h)],
                GRID.stroke_width(1),
            ))
            .plot()?;
            let row_y = |k: usize| y0 + PAD + row_h * k as i32 + text_px as i32 / 2;
            for (k, (label, s)) in entries.iter().take(shown).enumerate() {
                let r = MARKER_R.min(row_h / 2 - 2);
                draw_sample(root, (x0 + PAD, row_y(k)), SAMPLE, s, r)?;
                draw_text(
                    root,
                    label,
                    (x0 + PAD + SAMPLE + PAD, row_y(k)),
                    &text_style(text_px, INK, HPos::Left, VPos::Center),
                )?;
            }
            if left_out > 0 {
                draw_text(
                    root,
                    &format!("+ {left_out} more series"),
                    (x0 + PAD, row_y(shown)),
                    &text_style(text_px, MUTED, HPos::Left, VPos::Center),
                )?;
            }
        }
        Ok(())
    }
}

impl DotPlan {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let body = draw_title(root, &self.title)?;
        let body = draw_caption(root, body, &self.caption)?;
        let (w, _) = root.dim_in_pixel();
        let (_, bh) = body.dim_in_pixel();
        let n = self.rows.len();

        let plot_h = bh as i32 - (TICK_PX + AXIS_PX) as i32 - 50;
        let row_px = plot_h / n.max(1) as i32;
        let label_px = TICK_PX.min(f64::from(row_px) * 0.7).max(10.0);
        let max_label_w = (w as f64 * 0.38) as i32;
        let labels: Vec<String> = self
            .rows
            .iter()
            .map(|r| fit_text(root, &r.label, label_px, max_label_w))
            .collect();
        let label_w = labels
            .iter()
            .map(|l| text_width(root, l, label_px))
            .max()
            .unwrap_or(0);
        let note_w = self
            .rows
            .iter()
            .map(|r| text_width(root, &r.note, label_px))
            .max()
            .unwrap_or(0);
        let x_last_w = self
            .x
            .ticks
            .iter()
            .rfind(|t| **t <= self.band_lo)
            .map_or(0, |&t| text_width(root, &self.x.label(t), TICK_PX));

        let mut y = Axis::fixed(false, -0.6, n as f64 - 0.4);
        y.ticks = (0..n).map(|k| k as f64).collect();
        y.minor = Vec::new();
        let mut x = self.x.clone();
        x.ticks.retain(|t| *t <= self.band_lo);
        x.minor.retain(|t| *t <= self.band_lo);
        let mut chart = ChartBuilder::on(&body)
            .margin_top(8)
            .margin_bottom(4)
            .margin_left(MARGIN)
            .margin_right(if note_w > 0 {
                note_w + 2 * MARGIN
            } else {
                MARGIN.max(x_last_w / 2 + 6)
            })
            .x_label_area_size(TICK_PX as i32 + AXIS_PX as i32 + 34)
            .y_label_area_size(label_w + 22)
            .build_cartesian_2d(x.clone(), y.clone())
            .plot()?;
        let row_of = |u: f64| -> Option<usize> {
            let k = u.round();
            (k >= 0.0 && (k as usize) < n).then(|| n - 1 - k as usize)
        };
        let y_fmt = |u: &f64| row_of(*u).map_or(String::new(), |i| labels[i].clone());
        draw_mesh(
            &mut chart,
            &x,
            &y,
            &self.x_label,
            "",
            Some(&y_fmt),
            label_px,
        )?;

        let area = chart.plotting_area().clone();
        let (xr, yr) = area.get_pixel_range();
        let px = |u: f64, row: usize| area.map_coordinate(&(x.clamp(u), (n - 1 - row) as f64));
        let (dot_color, miss_color) = (PALETTE[0], PALETTE[1]);
        if self.band_lo < x.hi {
            let (bx, _) = px(self.band_lo, 0);
            root.draw(&Rectangle::new(
                [(bx, yr.start), (xr.end, yr.end)],
                MISS_BAND.filled(),
            ))
            .plot()?;
            root.draw(&PathElement::new(
                vec![(bx, yr.start), (bx, yr.end)],
                GRID.stroke_width(1),
            ))
            .plot()?;
        }
        let whisker = dot_color.stroke_width(2);
        for (i, r) in self.rows.iter().enumerate() {
            if let Some((lo, hi)) = r.whisker {
                let (x0, cy) = px(lo, i);
                let (x1, _) = px(hi.unwrap_or(self.band_lo), i);
                root.draw(&PathElement::new(vec![(x0, cy), (x1, cy)], whisker))
                    .plot()?;
                root.draw(&PathElement::new(vec![(x0, cy - 6), (x0, cy + 6)], whisker))
                    .plot()?;
                let cap = if hi.is_none() {
                    vec![(x1 - 7, cy - 5), (x1, cy), (x1 - 7, cy + 5)]
                } else {
                    vec![(x1, cy - 6), (x1, cy + 6)]
                };
                root.draw(&PathElement::new(cap, whisker)).plot()?;
            }
            match r.mark {
                DotMark::Dot(v) => draw_marker(root, px(v, i), Shape::Circle, dot_color, MARKER_R)?,
                DotMark::Missed => {
                    let (bx, cy) = px(self.band_lo, i);
                    draw_marker(root, (bx + 16, cy), Shape::Cross, miss_color, MARKER_R - 1)?;
                    draw_text(
                        root,
                        "missed",
                        (bx + 30, cy),
                        &text_style(label_px.min(TICK_PX), miss_color, HPos::Left, VPos::Center),
                    )?;
                }
                DotMark::NoData => {
                    let (_, cy) = px(x.lo, i);
                    draw_text(
                        root,
                        "no data",
                        (xr.start + 8, cy),
                        &text_style(label_px, MUTED, HPos::Left, VPos::Center),
                    )?;
                }
            }
            let (_, cy) = px(x.lo, i);
            draw_text(
                root,
                &r.note,
                (xr.end + MARGIN, cy),
                &text_style(label_px, MUTED, HPos::Left, VPos::Center),
            )?;
        }
        Ok(())
    }
}

impl HeatPlan {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let body = draw_title(root, &self.title)?;
        draw_caption(root, body, &self.caption)?;
        let (cw, ch) = self.cell;
        let tick = |px: f64, h: HPos, v: VPos| text_style(px, INK, h, v);
        for p in &self.panels {
            let (gx0, gy0, gx1, gy1) = p.grid;
            let panel_x0 = gx0 - self.row_label_w;
            let label = fit_text(root, &p.label, LEGEND_PX, gx1 - panel_x0);
            draw_text(
                root,
                &label,
                ((panel_x0 + gx1) / 2, gy0 - 8),
                &tick(LEGEND_PX, HPos::Center, VPos::Bottom),
            )?;
            for (r, row) in p.cells.iter().enumerate() {
                for (c, cell) in row.iter().enumerate() {
                    let (x, y) = (gx0 + c as i32 * cw, gy0 + r as i32 * ch);
                    let rect = (x, y, x + cw, y + ch);
                    draw_cell(root, rect, cell.fill, cell.value.is_none())?;
                    draw_text(
                        root,
                        &cell.text,
                        (x + cw / 2, y + ch / 2),
                        &text_style(self.value_px, cell.ink, HPos::Center, VPos::Center),
                    )?;
                }
            }
            root.draw(&Rectangle::new(
                [(gx0, gy0), (gx1, gy1)],
                MUTED.stroke_width(1),
            ))
            .plot()?;
            for (r, l) in self.row_labels.iter().enumerate() {
                let y = gy0 + r as i32 * ch + ch / 2;
                draw_text(
                    root,
                    l,
                    (gx0 - 8, y),
                    &tick(TICK_PX, HPos::Right, VPos::Center),
                )?;
            }
            for (c, l) in self.col_labels.iter().enumerate() {
                let x = gx0 + c as i32 * cw + cw / 2;
                draw_text(
                    root,
                    l,
                    (x, gy1 + 6),
                    &tick(self.col_px, HPos::Center, VPos::Top),
                )?;
            }
        }

        // Axis descriptions, shared by every panel.
        let left = self.panels.iter().map(|p| p.grid.0).min().unwrap_or(0);
        let right = self.panels.iter().map(|p| p.grid.2).max().unwrap_or(0);
        let top = self.panels.iter().map(|p| p.grid.1).min().unwrap_or(0);
        let bottom = self.panels.iter().map(|p| p.grid.3).max().unwrap_or(0);
        let axis_y = bottom + TICK_PX as i32 + 22;
        draw_text(
            root,
            &fit_text(
                root,
                &self.x_label,
                AXIS_PX,
                right - left + self.row_label_w,
            ),
            ((left + right) / 2, axis_y),
            &tick(AXIS_PX, HPos::Center, VPos::Top),
        )?;
        if !self.y_label.is_empty() {
            let y_label = fit_text(root, &self.y_label, AXIS_PX, bottom - top + 40);
            let style = font(AXIS_PX)
                .transform(FontTransform::Rotate270)
                .color(&INK)
                .pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(y_label, (MARGIN, (top + bottom) / 2), style))
                .plot()?;
        }

        // The colour bar, 1 on top, with the "no data" swatch below it.
        let (bx0, by0, bx1, by1) = self.bar;
        let h = by1 - by0;
        for k in 0..h {
            let c = heat_colour(1.0 - f64::from(k) / f64::from(h - 1));
            root.draw(&Rectangle::new(
                [(bx0, by0 + k), (bx1, by0 + k + 1)],
                c.filled(),
            ))
            .plot()?;
        }
        root.draw(&Rectangle::new(
            [(bx0, by0), (bx1, by1)],
            MUTED.stroke_width(1),
        ))
        .plot()?;
        for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = by1 - (t * f64::from(h)).round() as i32;
            root.draw(&PathElement::new(
                vec![(bx1, y), (bx1 + 5, y)],
                INK.stroke_width(1),
            ))
            .plot()?;
            draw_text(
                root,
                &fmt_number(t),
                (bx1 + 9, y),
                &tick(TICK_PX, HPos::Left, VPos::Center),
            )?;
        }
        if self.any_missing {
            let (sy0, sy1) = (by1 + 24, by1 + 24 + (bx1 - bx0));
            draw_cell(root, (bx0, sy0, bx1, sy1), MISSING_CELL, true)?;
            root.draw(&Rectangle::new(
                [(bx0, sy0), (bx1, sy1)],
                MUTED.stroke_width(1),
            ))
            .plot()?;
            draw_text(
                root,
                "no data",
                (bx1 + 9, (sy0 + sy1) / 2),
                &tick(TICK_PX, HPos::Left, VPos::Center),
            )?;
        }
        Ok(())
    }
}

/// A filled cell with a white rim (so neighbours read as tiles), hatched
/// when it has no value.
fn draw_cell<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x0, y0, x1, y1): Rect,
    fill: RGBColor,
    hatched: bool,
) -> anyhow::Result<()> {
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], fill.filled()))
        .plot()?;
    if hatched {
        for seg in hatch((x0, y0, x1, y1), 7) {
            root.draw(&PathElement::new(
                seg.to_vec(),
                MISSING_HATCH.stroke_width(1),
            ))
            .plot()?;
        }
    }
    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], WHITE.stroke_width(1)))
        .plot()
}

impl EmptyPlan {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let body = draw_title(root, &self.title)?;
        let (w, h) = body.dim_in_pixel();
        let (x0, y0) = body.get_base_pixel();
        let (cx, cy) = (x0 + w as i32 / 2, y0 + h as i32 / 2);
        root.draw(&Rectangle::new(
            [
                (x0 + 4 * MARGIN, y0 + MARGIN),
                (x0 + w as i32 - 4 * MARGIN, y0 + h as i32 - 4 * MARGIN),
            ],
            GRID.stroke_width(1),
        ))
        .plot()?;
        draw_text(
            root,
            "no finite data",
            (cx, cy - 24),
            &text_style(AXIS_PX * 1.4, MUTED, HPos::Center, VPos::Center),
        )?;
        let detail = fit_text(root, &self.detail, AXIS_PX, w as i32 - 10 * MARGIN);
        draw_text(
            root,
            &detail,
            (cx, cy + 24),
            &text_style(AXIS_PX, MUTED, HPos::Center, VPos::Center),
        )
    }
}

impl Plan {
    fn size(&self) -> (u32, u32) {
        match self {
            Plan::Xy(p) => p.size,
            Plan::Dots(p) => p.size,
            Plan::Heat(p) => p.size,
            Plan::Pareto(p) => p.xy.size,
            Plan::Empty(_) => (WIDTH, HEIGHT),
        }
    }

    /// `raster`: the backend is a bitmap (see [`draw_polyline`]).
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        raster: bool,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).plot()?;
        match self {
            Plan::Xy(p) => p.draw(root, raster)?,
            Plan::Dots(p) => p.draw(root)?,
            Plan::Heat(p) => p.draw(root)?,
            Plan::Pareto(p) => p.xy.draw(root, raster)?,
            Plan::Empty(p) => p.draw(root)?,
        }
        root.present().plot()
    }
}

// ---------------------------------------------------------------------------
// Files.

static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded font bench-suite/assets/DejaVuSans.ttf is not a valid TrueType \
             font; restore it from git"
        ))
    }
}

fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut s = OsString::from(stem.as_os_str());
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// A fresh name beside `path`, ending in `.ext` (the PNG encoder picks the
/// format from the extension).
fn temp_beside(path: &Path, ext: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{n}.tmp.{ext}", std::process::id()))
}

/// Writes 8-bit RGB pixels as a PNG at zlib's best level with adaptive
/// filters: about half the bytes of plotters' own encoder for the same
/// pixels (the charts are committed with every run).
fn encode_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> anyhow::Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}

fn write_figure(plan: &Plan, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    ensure_font()?;
    let svg_path = with_suffix(stem, "svg");
    let png_path = with_suffix(stem, "png");
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the chart directory {}", dir.display()))?;
    }
    let size = plan.size();

    // Each backend is dropped before its file is renamed: dropping flushes.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        plan.draw(&root, false)
            .with_context(|| format!("drawing {}", svg_path.display()))?;
    }
    let tmp = temp_beside(&svg_path, "svg");
    let written =
        std::fs::write(&tmp, svg.as_bytes()).and_then(|()| std::fs::rename(&tmp, &svg_path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", svg_path.display()));
    }

    // Drawn into memory, then encoded by `png` (see `encode_png`).
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        plan.draw(&root, true)
            .with_context(|| format!("drawing {}", png_path.display()))?;
    }
    let tmp = temp_beside(&png_path, "png");
    let written = encode_png(&tmp, size, &rgb).and_then(|()| Ok(std::fs::rename(&tmp, &png_path)?));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", png_path.display()));
    }
    Ok(vec![svg_path, png_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    /// A fresh directory under the system temp dir for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bench-suite-charts-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Checks a PNG's structure: the signature, every chunk's length and
    /// CRC, an IHDR first with the expected size, IDAT data, IEND last.
    /// Returns (width, height).
    fn check_png(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.len() > 10_000,
            "{} is only {} bytes",
            path.display(),
            bytes.len()
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let mut at = 8;
        let mut kinds = Vec::new();
        let mut size = (0, 0);
        while at < bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = &bytes[at + 4..at + 8];
            let body = &bytes[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(bytes[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc32(&bytes[at + 4..at + 8 + len]), crc, "CRC of {kind:?}");
            if kind == b"IHDR" {
                size = (
                    u32::from_be_bytes(body[0..4].try_into().unwrap()),
                    u32::from_be_bytes(body[4..8].try_into().unwrap()),
                );
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            at += 12 + len;
        }
        assert_eq!(at, bytes.len(), "chunks end exactly at the end of the file");
        assert_eq!(kinds.first().map(String::as_str), Some("IHDR"));
        assert_eq!(kinds.last().map(String::as_str), Some("IEND"));
        assert!(kinds.iter().any(|k| k == "IDAT"));
        size
    }

    /// Both files exist, the PNG is a well-formed image of `size`, and the
    /// SVG has each of `texts`.
    fn check_outputs(written: &[PathBuf], stem: &Path, size: (u32, u32), texts: &[&str]) {
        assert_eq!(
            written,
            &[with_suffix(stem, "svg"), with_suffix(stem, "png")],
            "returns the SVG and the PNG"
        );
        assert_eq!(check_png(&written[1]), size);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains(&format!("width=\"{}\" height=\"{}\"", size.0, size.1)));
        for t in texts {
            assert!(svg.contains(t), "SVG lacks {t:?}");
        }
        // No temporary file is left behind.
        let dir = stem.parent().unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp."), "left behind {name}");
        }
    }

    fn pt(x: f64, y: f64) -> Point {
        Point {
            x,
            y,
            lo: None,
            hi: None,
        }
    }

    fn line(label: &str, points: Vec<Point>) -> Line {
        Line {
            label: label.into(),
            points,
            dashed: false,
            step: false,
        }
    }

    fn sample_line_chart() -> LineChart {
        let measured = |k: f64| {
            (1..=6)
                .map(|i| {
                    let x = f64::from(1 << i) * 128.0;
                    let y = 1e-4 * x * k;
                    Point {
                        x,
                        y,
                        lo: Some(y * 0.8),
                        hi: Some(y * 1.3),
                    }
                })
                .collect()
        };
        LineChart {
            title: "Decode time against context length".into(),
            x_label: "context length (tokens)".into(),
            y_label: "time per token (ms)".into(),
            log_x: true,
            log_y: true,
            lines: vec![
                line("spectr k=4,L=8", measured(1.0)),
                line("dense attention (reference)", measured(3.0)),
                Line {
                    label: "theory: O(n)".into(),
                    points: (1..=6)
                        .map(|i| pt(f64::from(1 << i) * 128.0, 2e-4 * f64::from(1 << i) * 128.0))
                        .collect(),
                    dashed: true,
                    step: false,
                },
                Line {
                    label: "budget".into(),
                    points: vec![pt(256.0, 0.05), pt(2048.0, 0.5), pt(8192.0, 2.0)],
                    dashed: false,
                    step: true,
                },
            ],
            y_range: None,
        }
    }

    fn sample_dot_chart() -> DotChart {
        let mut rows: Vec<DotRow> = [(4, 8, 2.1), (4, 16, 1.6), (8, 8, 1.2), (8, 16, 0.9)]
            .into_iter()
            .map(|(k, l, v)| DotRow {
                label: format!("spectr k={k},L={l}"),
                value: v,
                lo: v * 0.85,
                hi: v * 1.25,
                note: "5/5".into(),
            })
            .collect();
        rows.push(DotRow {
            label: "dense attention (reference)".into(),
            value: 3.4,
            lo: 3.1,
            hi: 3.9,
            note: "5/5".into(),
        });
        rows.push(DotRow {
            label: "spectr k=2,L=4".into(),
            value: INF,
            lo: 4.2,
            hi: INF,
            note: "2/5".into(),
        });
        rows.push(DotRow {
            label: "spectr k=1,L=2".into(),
            value: INF,
            lo: INF,
            hi: INF,
            note: "0/5".into(),
        });
        rows.push(DotRow {
            label: "spectr k=16,L=32".into(),
            value: 0.7,
            lo: 0.6,
            hi: INF,
            note: "3/5".into(),
        });
        DotChart {
            title: "Time-to-result: spectr / 4k (median, 95% CI)".into(),
            x_label: "time-to-result (s)".into(),
            log_x: true,
            rows,
        }
    }

    fn sample_profile() -> PerformanceProfile {
        let times = vec![
            vec![1.0, 2.0, 3.0, 10.0, 4.0],
            vec![2.0, 1.0, INF, 12.0, 4.0],
            vec![1.5, 3.0, 3.3, 8.0, 9.0],
            vec![INF, INF, INF, INF, INF],
        ];
        PerformanceProfile::new(
            vec![
                "spectr".into(),
                "dense attention".into(),
                "padded window".into(),
                "broken".into(),
            ],
            (0..5).map(|i| format!("problem {i}")).collect(),
            times,
        )
    }

    /// The PNG encoder is lossless: a file decodes to the pixels written.
    #[test]
    fn png_encoding_round_trips_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let (w, h) = (37u32, 23u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        encode_png(&path, (w, h), &rgb).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    }

    #[test]
    fn line_chart_writes_svg_and_png() {
        let dir = scratch("line");
        let stem = dir.join("decode");
        let written = render_line(&sample_line_chart(), &stem).unwrap();
        check_outputs(
            &written,
            &stem,
            (WIDTH, HEIGHT),
            &[
                "Decode time against context length",
                "context length (tokens)",
                "time per token (ms)",
                "spectr k=4,L=8",
            ],
        );
        // Rendering again replaces the files in place.
        assert_eq!(render_line(&sample_line_chart(), &stem).unwrap(), written);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn dot_chart_writes_svg_and_png() {
        let dir = scratch("dots");
        let stem = dir.join("ttr");
        let chart = sample_dot_chart();
        let written = render_dots(&chart, &stem).unwrap();
        let height = match dot_plan(&chart) {
            Plan::Dots(p) => p.size.1,
            other => panic!("expected a dot plan, got {other:?}"),
        };
        check_outputs(
            &written,
            &stem,
            (WIDTH, height),
            &[
                "Time-to-result: spectr / 4k (median, 95% CI)",
                "time-to-result (s)",
                "spectr k=4,L=16",
                "missed",
                "2/5",
            ],
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn profile_chart_writes_svg_and_png() {
        let dir = scratch("profile");
        let stem = dir.join("profile");
        let p = sample_profile();
        let written = render_profile(&p, "Performance profile: spectr", &stem).unwrap();
        let b = format!("spectr  (B = {:.3})", p.score[0]);
        check_outputs(
            &written,
            &stem,
            (WIDTH, HEIGHT),
            &[
                "Performance profile: spectr",
                "τ: time over the fastest",
                "ρ(τ): share of problems",
                &b,
                "broken  (B = 0.000)",
            ],
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The profile is drawn as its exact step function: rho jumps at each
    /// ratio, and the curve ends at tau = 4 on the share solved by then.
    #[test]
    fn profile_steps_are_exact() {
        let p = PerformanceProfile::new(
            vec!["a".into(), "b".into()],
            vec!["p0".into(), "p1".into()],
            vec![vec![1.0, 3.0], vec![2.0, 1.0]],
        );
        let Plan::Xy(plan) = profile_plan(&p, "t") else {
            panic!("expected a profile plan")
        };
        // a: ratios [1, 3]; b: ratios [2, 1/3 -> 1].
        assert_eq!(
            plan.series[0].path,
            vec![(1.0, 0.5), (3.0, 0.5), (3.0, 1.0), (4.0, 1.0)]
        );
        assert_eq!(
            plan.series[1].path,
            vec![(1.0, 0.5), (2.0, 0.5), (2.0, 1.0), (4.0, 1.0)]
        );
    }

    #[test]
    fn degenerate_line_charts_do_not_panic() {
        let dir = scratch("degenerate-lines");
        let base = LineChart {
            title: "degenerate".into(),
            x_label: "x (s)".into(),
            y_label: "y (s)".into(),
            log_x: false,
            log_y: false,
            lines: vec![],
            y_range: None,
        };
        let cases: Vec<(&str, LineChart)> = vec![
            ("no-lines", base.clone()),
            (
                "empty-line",
                LineChart {
                    lines: vec![line("empty", vec![])],
                    ..base.clone()
                },
            ),
            (
                "single-point",
                LineChart {
                    lines: vec![line("one", vec![pt(3.0, 7.0)])],
                    ..base.clone()
                },
            ),
            (
                "all-equal",
                LineChart {
                    lines: vec![line("flat", vec![pt(0.0, 0.0), pt(0.0, 0.0), pt(0.0, 0.0)])],
                    ..base.clone()
                },
            ),
            (
                "non-finite",
                LineChart {
                    lines: vec![line(
                        "holes",
                        vec![pt(1.0, 1.0), pt(2.0, f64::NAN), pt(INF, 3.0), pt(4.0, 2.0)],
                    )],
                    ..base.clone()
                },
            ),
            (
                "log-with-zeros",
                LineChart {
                    log_x: true,
                    log_y: true,
                    lines: vec![line(
                        "zeros",
                        vec![pt(0.0, 1.0), pt(1.0, 0.0), pt(-1.0, 2.0), pt(10.0, 5.0)],
                    )],
                    ..base.clone()
                },
            ),
            (
                "log-narrow",
                LineChart {
                    log_y: true,
                    lines: vec![line("narrow", vec![pt(1.0, 0.21), pt(2.0, 0.27)])],
                    ..base.clone()
                },
            ),
            (
                "bad-y-range-and-open-whiskers",
                LineChart {
                    y_range: Some((5.0, 1.0)),
                    lines: vec![line(
                        "w",
                        vec![
                            Point {
                                x: 1.0,
                                y: 2.0,
                                lo: Some(f64::NEG_INFINITY),
                                hi: Some(INF),
                            },
                            Point {
                                x: 2.0,
                                y: 2.0,
                                lo: Some(f64::NAN),
                                hi: Some(2.5),
                            },
                        ],
                    )],
                    ..base.clone()
                },
            ),
            (
                "many-lines-long-labels",
                LineChart {
                    lines: (0..40)
                        .map(|i| {
                            line(
                                &format!(
                                    "configuration {i} with a rather long label k=4,L=8,w=128"
                                ),
                                vec![pt(0.0, f64::from(i)), pt(1.0, f64::from(i) * 1.5)],
                            )
                        })
                        .collect(),
                    ..base.clone()
                },
            ),
        ];
        for (name, chart) in cases {
            let stem = dir.join(name);
            let written = render_line(&chart, &stem).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            check_outputs(&written, &stem, (WIDTH, HEIGHT), &["degenerate"]);
            let svg = std::fs::read_to_string(&written[0]).unwrap();
            let empty = matches!(name, "no-lines" | "empty-line");
            assert_eq!(svg.contains("no finite data"), empty, "{name}");
            if name == "non-finite" || name == "log-with-zeros" {
                assert!(svg.contains("not drawn"), "{name} says what it skipped");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn degenerate_dot_charts_do_not_panic() {
        let dir = scratch("degenerate-dots");
        let row = |label: &str, value: f64, lo: f64, hi: f64| DotRow {
            label: label.into(),
            value,
            lo,
            hi,
            note: String::new(),
        };
        let base = DotChart {
            title: "dots".into(),
            x_label: "time-to-result (s)".into(),
            log_x: true,
            rows: vec![],
        };
        let cases: Vec<(&str, DotChart, bool)> = vec![
            ("no-rows", base.clone(), true),
            (
                "all-missed",
                DotChart {
                    rows: vec![row("a", INF, INF, INF), row("b", INF, INF, INF)],
                    ..base.clone()
                },
                true,
            ),
            (
                "single",
                DotChart {
                    rows: vec![row("only", 2.0, 2.0, 2.0)],
                    ..base.clone()
                },
                false,
            ),
            (
                "nan-and-zero",
                DotChart {
                    rows: vec![
                        row("nan", f64::NAN, f64::NAN, f64::NAN),
                        row("zero on log", 0.0, 0.0, 1.0),
                        row("fine", 1.0, 0.5, 2.0),
                    ],
                    ..base.clone()
                },
                false,
            ),
            (
                "thirty-rows",
                DotChart {
                    log_x: false,
                    rows: (0..30)
                        .map(|i| {
                            let v = 1.0 + f64::from(i) * 0.1;
                            row(
                                &format!(
                                    "spectr k={},L={} a very long configuration label",
                                    i,
                                    2 * i
                                ),
                                if i % 7 == 3 { INF } else { v },
                                v * 0.9,
                                v * 1.1,
                            )
                        })
                        .collect(),
                    ..base.clone()
                },
                false,
            ),
        ];
        for (name, chart, empty) in cases {
            let stem = dir.join(name);
            let written = render_dots(&chart, &stem).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let size = dot_plan(&chart).size();
            check_outputs(&written, &stem, size, &["dots"]);
            let svg = std::fs::read_to_string(&written[0]).unwrap();
            assert_eq!(svg.contains("no finite data"), empty, "{name}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn degenerate_profiles_do_not_panic() {
        let dir = scratch("degenerate-profiles");
        let cases = [
            (
                "no-methods",
                PerformanceProfile::new(vec![], vec!["p".into()], vec![]),
            ),
            (
                "all-missed",
                PerformanceProfile::new(vec!["m".into()], vec!["p".into()], vec![vec![INF]]),
            ),
            (
                "no-problems",
                PerformanceProfile::new(vec!["m".into()], vec![], vec![vec![]]),
            ),
        ];
        for (name, p) in cases {
            let stem = dir.join(name);
            let written =
                render_profile(&p, "profile", &stem).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            check_outputs(&written, &stem, (WIDTH, HEIGHT), &["profile"]);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_stem_with_dots_keeps_its_name() {
        let dir = scratch("stem-dots");
        let stem = dir.join("spectr-k=4.5");
        let written = render_line(&sample_line_chart(), &stem).unwrap();
        assert_eq!(written[0], dir.join("spectr-k=4.5.svg"));
        assert_eq!(written[1], dir.join("spectr-k=4.5.png"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn linear_ticks_are_round() {
        let (t, _, d) = linear_ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert_eq!(d, 1);
        let a = Axis::fixed(false, 0.0, 1.0);
        let labels: Vec<String> = a.ticks.iter().map(|&u| a.label(u)).collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let a = Axis::fixed(false, -0.05, 0.05);
        assert!(a.ticks.iter().all(|&u| !a.label(u).starts_with("-0.00")));
        let (t, _, d) = linear_ticks(0.0, 10.0);
        assert_eq!((t, d), (vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0], 0));
    }

    #[test]
    fn log_ticks_always_label_the_axis() {
        // Decades when the range spans them.
        let (t, _) = log_ticks(-3.2, 2.1);
        assert_eq!(t, vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]);
        // At most eight decade ticks over a wide range.
        assert!(log_ticks(-20.0, 20.0).0.len() <= 8);
        // Inside one decade: still at least two labelled ticks (plotters'
        // own log axis draws none on 0.2..0.8).
        for (lo, hi) in [(0.2f64, 0.8f64), (0.21, 0.27), (3.0, 4.0), (1.01, 1.02)] {
            let (t, _) = log_ticks(lo.log10(), hi.log10());
            assert!(t.len() >= 2, "{lo}..{hi}: {t:?}");
            assert!(t
                .iter()
                .all(|u| (lo.log10() - 1e-9..=hi.log10() + 1e-9).contains(u)));
        }
    }

    #[test]
    fn numbers_read_well() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (0.01, "0.01"),
            (0.001, "0.001"),
            (0.0001, "1e-4"),
            (1234.6, "1235"),
            (100000.0, "1e5"),
            (2.5e6, "2.5e6"),
            (10f64.powf(-2.0), "0.01"),
            (10f64.powf(3.0), "1000"),
            (0.25, "0.25"),
        ];
        for (v, s) in cases {
            assert_eq!(fmt_number(v), s, "{v}");
        }
    }

    #[test]
    fn simplify_keeps_shape_and_drops_collinear_points() {
        let line: Vec<(i32, i32)> = (0..=100).map(|i| (i, 2 * i)).collect();
        assert_eq!(simplify(&line, 0.5), vec![(0, 0), (100, 200)]);
        let step = vec![(0, 0), (5, 0), (10, 0), (10, 5), (10, 10), (20, 10)];
        assert_eq!(
            simplify(&step, 0.5),
            vec![(0, 0), (10, 0), (10, 10), (20, 10)]
        );
        // Every dropped point lies within eps of the simplified path.
        let wiggly: Vec<(i32, i32)> = (0..500)
            .map(|i| (i, (100.0 * (f64::from(i) / 40.0).sin()) as i32))
            .collect();
        let kept = simplify(&wiggly, 0.5);
        assert!(
            kept.len() < wiggly.len() / 2,
            "{} of {}",
            kept.len(),
            wiggly.len()
        );
        for &(x, y) in &wiggly {
            let w = kept
                .windows(2)
                .find(|w| w[0].0 <= x && x <= w[1].0)
                .unwrap();
            let (ax, ay, bx, by) = (w[0].0, w[0].1, w[1].0, w[1].1);
            let d = (f64::from((x - ax) * (by - ay) - (y - ay) * (bx - ax))).abs()
                / f64::from(bx - ax).hypot(f64::from(by - ay));
            assert!(d <= 0.5 + 1e-9, "({x}, {y}) is {d} px off");
        }
        assert_eq!(simplify(&[(1, 1), (1, 1)], 0.5), vec![(1, 1)]);
        assert!(simplify(&[], 0.5).is_empty());
    }

    #[test]
    fn dashes_alternate_along_corners() {
        // 50 px straight: dashes at 0-12, 20-32, 40-50.
        let d = dashes(&[(0, 0), (50, 0)], 12.0, 8.0);
        assert_eq!(
            d,
            vec![
                vec![(0, 0), (12, 0)],
                vec![(20, 0), (32, 0)],
                vec![(40, 0), (50, 0)]
            ]
        );
        // Round a corner: the first dash bends with the path.
        let d = dashes(&[(0, 0), (6, 0), (6, 30)], 12.0, 8.0);
        assert_eq!(d[0], vec![(0, 0), (6, 0), (6, 6)]);
        assert_eq!(d[1], vec![(6, 14), (6, 26)]);
    }

    const NAN: f64 = f64::NAN;

    // --- Pareto front --------------------------------------------------

    #[test]
    fn pareto_front_drops_dominated_points_and_keeps_ties() {
        // Lower x (time) and higher y (accuracy) are better.
        let pts = [
            (1.0, 0.5), // 0: fastest
            (2.0, 0.9), // 1
            (2.0, 0.8), // 2: same x as 1, worse y: dominated
            (3.0, 0.9), // 3: same y as 1, slower: dominated
            (4.0, 1.0), // 4: most accurate
            (2.0, 0.9), // 5: equal to 1: neither dominates the other
            (5.0, 0.4), // 6: worse than 0 on both
        ];
        assert_eq!(pareto_front(&pts, false, true), vec![0, 1, 5, 4]);
        // The slowest point is also the least accurate: it beats them all.
        assert_eq!(pareto_front(&pts, true, false), vec![6]);
        // Higher is better on both: the top-right corner.
        assert_eq!(pareto_front(&pts, true, true), vec![4, 6]);
        assert_eq!(pareto_front(&pts, false, false), vec![0, 6]);
    }

    #[test]
    fn pareto_front_of_one_point_and_of_a_trade_off_curve() {
        assert_eq!(pareto_front(&[(3.0, -2.0)], false, true), vec![0]);
        assert!(pareto_front(&[], true, true).is_empty());
        // Every point trades x for y: all on the front, ordered by x.
        let curve: Vec<(f64, f64)> = (0..8)
            .rev()
            .map(|i| (f64::from(i), f64::from(i * i)))
            .collect();
        assert_eq!(
            pareto_front(&curve, false, true),
            (0..8).rev().collect::<Vec<_>>()
        );
        // Equal points only: all of them.
        assert_eq!(pareto_front(&[(1.0, 1.0); 3], true, true), vec![0, 1, 2]);
    }

    #[test]
    fn pareto_front_leaves_out_nan_and_infinity() {
        let pts = [
            (INF, INF), // would dominate everything if it counted
            (1.0, 1.0),
            (NAN, 5.0),
            (2.0, NAN),
            (0.5, 0.5),
            (-INF, 9.0),
        ];
        assert_eq!(pareto_front(&pts, true, true), vec![1]);
        assert_eq!(pareto_front(&pts, false, false), vec![4]);
        assert!(pareto_front(&[(NAN, NAN), (INF, 1.0)], true, true).is_empty());
    }

    fn sample_pareto_chart() -> ParetoChart {
        let group = |label: &str, pts: &[(f64, f64)]| ScatterGroup {
            label: label.into(),
            points: pts
                .iter()
                .enumerate()
                .map(|(k, &(x, y))| ScatterPoint {
                    label: format!("{label} budget={}", [0.1, 0.25, 0.5][k]),
                    x,
                    y,
                })
                .collect(),
        };
        ParetoChart {
            title: "Accuracy against speedup: long-context / needle".into(),
            x_label: "speedup over dense".into(),
            y_label: "exact match".into(),
            log_x: true,
            log_y: false,
            x_higher_better: true,
            y_higher_better: true,
            groups: vec![
                ScatterGroup {
                    label: "dense".into(),
                    points: vec![ScatterPoint {
                        label: "dense".into(),
                        x: 1.0,
                        y: 0.95,
                    }],
                },
                group("quest", &[(3.0, 0.7), (2.0, 0.9), (1.5, 0.93)]),
                group("streaming", &[(3.5, 0.3), (2.5, 0.5), (0.0, 0.8)]),
                group("h2o", &[(NAN, 0.5), (2.0, 0.6), (1.2, 0.9)]),
            ],
        }
    }

    #[test]
    fn pareto_plan_colours_entries_and_draws_the_front() {
        let Plan::Pareto(plan) = pareto_plan(&sample_pareto_chart()) else {
            panic!("expected a Pareto plan")
        };
        let series = &plan.xy.series;
        assert_eq!(series.len(), 5, "four entries and the front");
        let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            ["dense", "quest", "streaming", "h2o", "Pareto front"]
        );
        // One look per entry, none of them the front's black.
        let looks: Vec<usize> = series[..4].iter().map(|s| s.look).collect();
        assert_eq!(looks, [0, 1, 2, 3]);
        assert!((0..60).all(|i| group_look(i) % PALETTE.len() != FRONT_LOOK));
        assert_eq!(series_look(FRONT_LOOK).0, RGBColor(0, 0, 0));
        // An entry's points stay in parameter order, joined by a thin line;
        // x = 0 cannot be placed on the log axis, x = NaN nowhere.
        let l = f64::log10;
        assert_eq!(
            series[1].path,
            vec![(l(3.0), 0.7), (l(2.0), 0.9), (l(1.5), 0.93)]
        );
        assert_eq!(series[1].marks, series[1].path);
        assert_eq!(series[2].path, vec![(l(3.5), 0.3), (l(2.5), 0.5)]);
        assert_eq!(series[3].path, vec![(l(2.0), 0.6), (l(1.2), 0.9)]);
        assert!(series[..4].iter().all(|s| s.width < LINE_W && !s.dashed));
        // The front, by increasing speedup: dense (most accurate), quest at
        // 0.5 and 0.25, then quest 0.1 and streaming 0.1 (fastest).
        let front = &series[4];
        assert!(front.dashed && front.marks.is_empty() && !front.legend_marker);
        assert_eq!(
            front.path,
            vec![
                (0.0, 0.95),
                (l(1.5), 0.93),
                (l(2.0), 0.9),
                (l(3.0), 0.7),
                (l(3.5), 0.3)
            ]
        );
        assert_eq!(
            plan.front,
            [
                "dense",
                "quest budget=0.5",
                "quest budget=0.25",
                "quest budget=0.1",
                "streaming budget=0.1"
            ]
        );
        assert_eq!(
            plan.xy.caption,
            [
                "Pareto front (dashed): configurations that no other matches or beats on both axes \
                 (higher x and higher y are better).",
                "On the front: dense, quest budget=0.5, quest budget=0.25, quest budget=0.1, \
                 streaming budget=0.1.",
                "2 configurations not drawn: no finite x and y, or not positive on a log axis.",
            ]
        );
        // The axes hold every placed point.
        assert!(plan.xy.x.lo < 0.0 && plan.xy.x.hi > l(3.5));
        assert!(plan.xy.y.lo < 0.3 && plan.xy.y.hi > 0.95);
    }

    #[test]
    fn pareto_plan_without_finite_points_says_so() {
        let mut chart = sample_pareto_chart();
        for g in &mut chart.groups {
            for p in &mut g.points {
                p.y = NAN;
            }
        }
        let Plan::Empty(e) = pareto_plan(&chart) else {
            panic!("expected an empty plan")
        };
        assert_eq!(
            e.detail,
            "none of the 10 configurations has a finite x and y, or not positive on a log axis"
        );
        chart.groups.clear();
        assert!(matches!(pareto_plan(&chart), Plan::Empty(_)));
    }

    #[test]
    fn pareto_chart_writes_svg_and_png() {
        let dir = scratch("pareto");
        let stem = dir.join("pareto");
        let written = render_pareto(&sample_pareto_chart(), &stem).unwrap();
        check_outputs(
            &written,
            &stem,
            (WIDTH, HEIGHT),
            &[
                "Accuracy against speedup: long-context / needle",
                "speedup over dense",
                "exact match",
                "Pareto front",
                "streaming",
                "On the front: dense",
            ],
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    // --- Heat maps -----------------------------------------------------

    /// `n` configurations on a 3 x 4 grid (context x depth); the second has
    /// two cells missing and one out of range.
    fn sample_heat_chart(n: usize) -> HeatChart {
        let rows = vec![1024.0, 2048.0, 4096.0];
        let cols = vec![0.0, 25.0, 50.0, 100.0];
        let panels = (0..n)
            .map(|k| {
                let mut cells: Vec<Vec<Option<f64>>> = (0..rows.len())
                    .map(|r| {
                        (0..cols.len())
                            .map(|c| Some(1.0 - 0.1 * r as f64 - 0.05 * c as f64 - 0.02 * k as f64))
                            .collect()
                    })
                    .collect();
                if k == 1 {
                    cells[0][0] = None;
                    cells[2][3] = Some(NAN);
                    cells[1][1] = Some(1.25);
                }
                HeatPanel {
                    label: format!("quest budget={}%", 5 * (k + 1)),
                    cells,
                }
            })
            .collect();
        HeatChart {
            title: "Needle accuracy by context and depth: long-context / needle".into(),
            x_label: "needle depth (%)".into(),
            y_label: "context (tokens)".into(),
            rows,
            cols,
            panels,
        }
    }

    fn heat(chart: &HeatChart) -> HeatPlan {
        match heat_plan(chart) {
            Plan::Heat(p) => p,
            other => panic!("expected a heat plan, got {other:?}"),
        }
    }

    #[test]
    fn heat_colours_run_from_dark_to_light() {
        assert_eq!(heat_colour(0.0), VIRIDIS[0]);
        assert_eq!(heat_colour(1.0), VIRIDIS[10]);
        assert_eq!(heat_colour(0.5), VIRIDIS[5]);
        assert_eq!(heat_colour(-3.0), VIRIDIS[0]);
        assert_eq!(heat_colour(7.0), VIRIDIS[10]);
        // Halfway between two stops is their mean.
        assert_eq!(heat_colour(0.05), RGBColor(70, 19, 101));
        // Lightness rises all along, so the order survives greyscale.
        let l: Vec<f64> = (0..=100)
            .map(|k| lightness(heat_colour(f64::from(k) / 100.0)))
            .collect();
        assert!(l.windows(2).all(|w| w[1] > w[0]), "{l:?}");
    }

    #[test]
    fn heat_plan_prints_values_and_marks_missing_cells() {
        let plan = heat(&sample_heat_chart(2));
        assert_eq!(plan.row_labels, ["1024", "2048", "4096"]);
        assert_eq!(plan.col_labels, ["0", "25", "50", "100"]);
        let first = &plan.panels[0];
        assert_eq!(first.label, "quest budget=5%");
        assert_eq!(first.cells.len(), 3);
        assert!(first.cells.iter().all(|r| r.len() == 4));
        let c = &first.cells[0][0];
        assert_eq!(
            (c.value, c.text.as_str(), c.fill, c.ink),
            (Some(1.0), "1.00", VIRIDIS[10], INK)
        );
        let c = &first.cells[1][0];
        assert_eq!(
            (c.value, c.text.as_str(), c.fill),
            (Some(0.9), "0.90", VIRIDIS[9])
        );
        assert_eq!(first.cells[2][3].text, "0.65");
        // Dark cells get white text.
        let dark = heat(&HeatChart {
            panels: vec![HeatPanel {
                label: "dense".into(),
                cells: vec![vec![Some(0.05); 4]; 3],
            }],
            ..sample_heat_chart(0)
        });
        assert_eq!(dark.panels[0].cells[1][2].ink, WHITE);
        // Missing and NaN cells are hatched grey without text; a value
        // above 1 keeps its text and takes the top colour.
        let second = &plan.panels[1];
        for (r, c) in [(0, 0), (2, 3)] {
            let cell = &second.cells[r][c];
            assert_eq!(
                (cell.value, cell.fill, cell.text.as_str()),
                (None, MISSING_CELL, "")
            );
        }
        assert_eq!(second.cells[1][1].text, "1.25");
        assert_eq!(second.cells[1][1].fill, VIRIDIS[10]);
        assert!(plan.any_missing);
        assert_eq!(
            plan.caption,
            [
                "Each cell prints its value, coloured on a fixed 0 to 1 scale.",
                "Hatched grey cells: no finite value recorded (2 of 24).",
                "1 cell outside 0 to 1, coloured as the nearer end of the scale.",
            ]
        );
        // Without holes, the caption says nothing of them.
        let full = heat(&sample_heat_chart(1));
        assert!(!full.any_missing);
        assert_eq!(
            full.caption,
            ["Each cell prints its value, coloured on a fixed 0 to 1 scale."]
        );
        // A short row of cells is padded with missing ones.
        let ragged = heat(&HeatChart {
            panels: vec![HeatPanel {
                label: "ragged".into(),
                cells: vec![vec![Some(0.5)]],
            }],
            ..sample_heat_chart(0)
        });
        let missing = ragged.panels[0]
            .cells
            .iter()
            .flatten()
            .filter(|c| c.value.is_none())
            .count();
        assert_eq!(missing, 11);
    }

    #[test]
    fn heat_panels_sit_in_rows_of_four_and_the_canvas_grows() {
        let overlaps = |a: Rect, b: Rect| a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3;
        let mut last = (0, 0);
        for n in [1, 2, 4, 5, 8, 9] {
            let plan = heat(&sample_heat_chart(n));
            let (w, h) = (plan.size.0 as i32, plan.size.1 as i32);
            assert_eq!(plan.panels.len(), n);
            let (cw, ch) = plan.cell;
            for (k, p) in plan.panels.iter().enumerate() {
                let (x0, y0, x1, y1) = p.grid;
                assert_eq!((x1 - x0, y1 - y0), (4 * cw, 3 * ch), "panel {k} of {n}");
                // Row labels, panel label and column labels on the canvas.
                assert!(x0 - plan.row_label_w >= 0 && y0 >= 60 && x1 < w && y1 + 40 < h);
                // Left to right, then down: four to a row.
                let first = &plan.panels[k - k % HEAT_PER_ROW];
                assert_eq!(p.grid.1, first.grid.1, "panel {k} of {n} on its row");
                if k % HEAT_PER_ROW > 0 {
                    assert!(x0 > plan.panels[k - 1].grid.2 + plan.row_label_w);
                }
                if k >= HEAT_PER_ROW {
                    assert_eq!(x0, plan.panels[k - HEAT_PER_ROW].grid.0);
                    assert!(y0 > plan.panels[k - HEAT_PER_ROW].grid.3 + 40);
                }
                for q in &plan.panels[..k] {
                    assert!(!overlaps(p.grid, q.grid));
                }
                // The colour bar is right of every panel.
                assert!(plan.bar.0 > x1);
            }
            let rows = n.div_ceil(HEAT_PER_ROW) as i32;
            let distinct_rows = plan
                .panels
                .iter()
                .map(|p| p.grid.1)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as i32;
            assert_eq!(distinct_rows, rows);
            assert!(plan.bar.2 < w && plan.bar.3 < h);
            assert!(
                w >= last.0 && h >= last.1,
                "{n} panels: {w}x{h} after {last:?}"
            );
            last = (w, h);
        }
        // Wider with each panel up to four, then taller.
        let size = |n| heat(&sample_heat_chart(n)).size;
        assert!(size(2).0 > size(1).0 && size(4).0 > size(2).0);
        assert_eq!(size(5).0, size(4).0);
        assert!(size(5).1 > size(4).1);
        // Cells fit their values, and the printed values fit their cells.
        let plan = heat(&sample_heat_chart(2));
        assert!(plan.value_px >= 11.0 && plan.value_px <= 16.0);
        assert!(estimate_width("0.00", plan.value_px) <= plan.cell.0 - 6);
        assert!(estimate_width("100", plan.col_px) <= plan.cell.0);
    }

    #[test]
    fn heat_plan_without_finite_cells_says_so() {
        let mut chart = sample_heat_chart(2);
        for p in &mut chart.panels {
            for row in &mut p.cells {
                row.fill(Some(NAN));
            }
        }
        let detail = |c: &HeatChart| match heat_plan(c) {
            Plan::Empty(e) => e.detail,
            other => panic!("expected an empty plan, got {other:?}"),
        };
        assert_eq!(detail(&chart), "none of the 24 cells has a finite value");
        assert_eq!(
            detail(&HeatChart {
                cols: vec![],
                ..sample_heat_chart(1)
            }),
            "no rows or no columns"
        );
        assert_eq!(detail(&sample_heat_chart(0)), "no configurations");
    }

    #[test]
    fn hatching_stays_inside_the_cell() {
        let rect = (10, 20, 50, 44);
        let segs = hatch(rect, 7);
        // Lines x + y = k every 7 px across the whole cell.
        assert_eq!(segs.len(), ((50 + 44 - 10 - 20 - 1) / 7) as usize);
        for [(xa, ya), (xb, yb)] in segs {
            assert_eq!(xa + ya, xb + yb);
            for (x, y) in [(xa, ya), (xb, yb)] {
                assert!(
                    (10..=50).contains(&x) && (20..=44).contains(&y),
                    "({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn heat_chart_writes_svg_and_png() {
        let dir = scratch("heat");
        let stem = dir.join("heat");
        let chart = sample_heat_chart(6);
        let written = render_heat(&chart, &stem).unwrap();
        let size = heat(&chart).size;
        let mut texts = vec![
            "Needle accuracy by context and depth: long-context / needle",
            "needle depth (%)",
            "context (tokens)",
            "4096",
            "0.65",
            "no data",
            "Hatched grey cells",
        ];
        let labels: Vec<String> = chart.panels.iter().map(|p| p.label.clone()).collect();
        texts.extend(labels.iter().map(String::as_str));
        check_outputs(&written, &stem, size, &texts);
        // The empty chart is drawn too, saying why.
        let empty = render_heat(&sample_heat_chart(0), &dir.join("empty")).unwrap();
        check_outputs(
            &empty,
            &dir.join("empty"),
            (WIDTH, HEIGHT),
            &["no finite data"],
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
