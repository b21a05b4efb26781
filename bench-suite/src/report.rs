//! Renders `summary.md` and the charts from records (hyperfine's
//! `Exporter`: renderers read results, never the runner). Workload-specific
//! charts are declared as data in each workload's spec
//! ([`workloads::Chart`]) and drawn here.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use workloads::{Chart, Comparison, Series, Source, WorkloadSpec};

use crate::charts::{
    self, DotChart, DotRow, HeatChart, HeatPanel, Line, LineChart, ParetoChart, Point,
    ScatterGroup, ScatterPoint,
};
use crate::records::{self, RunInfo};
use crate::summary::{paired_speedup, ConfigSummary, HardwareGroup, ProfileSummary};

/// The charts drawn for one workload on one hardware: (title, file stem).
pub struct ChartLinks {
    pub hardware_id: String,
    pub workload: String,
    pub links: Vec<(String, String)>,
}

/// What the report is about, beyond the records: the runs' `run.json`.
pub struct ReportInput<'a> {
    pub groups: &'a [HardwareGroup],
    pub runs: &'a [RunInfo],
    pub registry: &'a [&'static dyn workloads::Workload],
}

/// Writes `summary.md` and `charts/` under `out`; returns the files written.
pub fn write_report(input: &ReportInput<'_>, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out.join("charts"))?;
    let mut written = Vec::new();
    let mut chart_links: Vec<ChartLinks> = Vec::new();
    for g in input.groups {
        for w in g.workloads() {
            let spec = spec_of(input.registry, w);
            let mut links = Vec::new();
            let hw = hw_suffix(input.groups, g);
            if let Some(p) = g
                .profiles
                .iter()
                .find(|p| p.scope == format!("workload {w}"))
            {
                let stem = out.join("charts").join(format!("{w}{hw}-profile"));
                written.extend(charts::render_profile(
                    &p.profile,
                    &format!("Performance profile: {w} (time-to-result)"),
                    &stem,
                )?);
                links.push(("performance profile".to_string(), rel(out, &stem)));
            }
            for v in g.variants(w) {
                let stem = out.join("charts").join(format!("{w}{hw}-{v}-ttr"));
                written.extend(charts::render_dots(&ttr_chart(g, w, v), &stem)?);
                links.push((format!("{v}: time-to-result"), rel(out, &stem)));
                for chart in spec.map(|s| s.charts).unwrap_or(&[]) {
                    if let Some(drawn) = spec_chart(g, w, v, chart) {
                        let stem = out.join("charts").join(format!("{w}{hw}-{v}-{}", chart.id));
                        written.extend(match &drawn {
                            SpecChart::Line(c) => charts::render_line(c, &stem)?,
                            SpecChart::Heat(c) => charts::render_heat(c, &stem)?,
                            SpecChart::Pareto(c) => charts::render_pareto(c, &stem)?,
                        });
                        links.push((format!("{v}: {}", chart.title), rel(out, &stem)));
                    }
                }
            }
            chart_links.push(ChartLinks {
                hardware_id: g.hardware_id.clone(),
                workload: w.to_string(),
                links,
            });
        }
        if let Some(p) = &g.suite_profile {
            let stem = out
                .join("charts")
                .join(format!("suite{}-profile", hw_suffix(input.groups, g)));
            written.extend(charts::render_profile(
                &p.profile,
                "Performance profile: suite",
                &stem,
            )?);
        }
    }
    let md = summary_markdown(input, &chart_links);
    let path = out.join("summary.md");
    records::write_atomic(&path, md.as_bytes())?;
    written.push(path);
    Ok(written)
}

fn hw_suffix(groups: &[HardwareGroup], g: &HardwareGroup) -> String {
    if groups.len() > 1 {
        format!("-{}", g.hardware_id)
    } else {
        String::new()
    }
}

fn rel(out: &Path, stem: &Path) -> String {
    stem.strip_prefix(out)
        .unwrap_or(stem)
        .to_string_lossy()
        .into_owned()
}

fn spec_of(
    registry: &[&'static dyn workloads::Workload],
    id: &str,
) -> Option<&'static WorkloadSpec> {
    registry.iter().map(|w| w.spec()).find(|s| s.id == id)
}

/// The Markdown summary. Pure function of its input: snapshot-tested.
pub fn summary_markdown(input: &ReportInput<'_>, chart_links: &[ChartLinks]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# bench-suite report\n");
    let _ = writeln!(
        s,
        "Time-to-result rules: see RULES.md. Times are medians over trials (a miss counts as infinity, shown as `miss`); intervals are 95% percentile-bootstrap intervals; speedups are medians of per-trial ratios against the reference baseline, paired by trial seed.\n"
    );
    if !input.runs.is_empty() {
        let _ = writeln!(s, "## Runs\n");
        let _ = writeln!(
            s,
            "| run | profile | trials | seed | device | shard | commit | hardware |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for r in input.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | `{}` | `{}` {} |",
                r.run_id,
                r.profile,
                r.trials,
                r.seed,
                r.device,
                r.shard.as_deref().unwrap_or("-"),
                short_commit(&r.git_commit),
                r.fingerprint.hardware_id,
                r.fingerprint.describe()
            );
        }
        s.push('\n');
    }
    let mixed = input.groups.len() > 1;
    for g in input.groups {
        if mixed {
            let desc = input
                .runs
                .iter()
                .find(|r| r.fingerprint.hardware_id == g.hardware_id)
                .map(|r| r.fingerprint.describe())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "## Hardware `{}` {desc}\n\nResults below are from this hardware only; they are not compared with other hardware.\n",
                g.hardware_id
            );
        }
        for w in g.workloads() {
            workload_section(&mut s, input, g, w, chart_links);
        }
        if let Some(p) = &g.suite_profile {
            let _ = writeln!(s, "## Suite-wide performance profile\n");
            profile_table(&mut s, p);
        }
    }
    s
}

fn short_commit(c: &str) -> String {
    let (hash, rest) = c.split_at(
        c.find(|ch: char| !ch.is_ascii_hexdigit())
            .unwrap_or(c.len()),
    );
    format!("{}{rest}", &hash[..hash.len().min(10)])
}

fn workload_section(
    s: &mut String,
    input: &ReportInput<'_>,
    g: &HardwareGroup,
    w: &str,
    chart_links: &[ChartLinks],
) {
    let spec = spec_of(input.registry, w);
    let version = g
        .configs
        .iter()
        .find(|c| c.workload == w)
        .map_or(0, |c| c.workload_version);
    match spec {
        Some(spec) => {
            let _ = writeln!(s, "## `{w}` v{version}: {}\n", spec.title);
            if spec.version != version {
                let _ = writeln!(
                    s,
                    "Note: these records are of version {version}; this bench-suite has version {}.\n",
                    spec.version
                );
            }
            for p in spec.papers {
                let _ = writeln!(s, "- {} (arXiv {}, {})", p.title, p.arxiv, p.section);
            }
            let _ = writeln!(
                s,
                "\nQuality metric: `{}` ({}), {}.\n",
                spec.metric.name,
                spec.metric.description,
                match spec.metric.direction {
                    workloads::Direction::HigherIsBetter => "higher is better",
                    workloads::Direction::LowerIsBetter => "lower is better",
                }
            );
        }
        None => {
            let _ = writeln!(
                s,
                "## `{w}` v{version} (not in this bench-suite's registry)\n"
            );
        }
    }
    for v in g.variants(w) {
        let _ = writeln!(s, "### Variant `{v}`\n");
        if let Some(var) = spec.and_then(|sp| sp.variant(v)) {
            let _ = writeln!(
                s,
                "{}\n\nTarget: {} (source: {}).\n",
                var.description, var.target.value, var.target.source
            );
        }
        config_table(s, g, w, v, spec);
    }
    if let Some(p) = g
        .profiles
        .iter()
        .find(|p| p.scope == format!("workload {w}"))
    {
        let _ = writeln!(s, "### Performance profile over variants\n");
        profile_table(s, p);
    }
    if let Some(spec) = spec {
        if !spec.claims.is_empty() {
            let _ = writeln!(s, "### The papers' claims, for comparison\n");
            for c in spec.claims {
                let _ = writeln!(s, "- {c}");
            }
            s.push('\n');
        }
    }
    if let Some(ChartLinks { links, .. }) = chart_links
        .iter()
        .find(|c| c.hardware_id == g.hardware_id && c.workload == w)
    {
        let _ = writeln!(s, "### Charts\n");
        for (title, stem) in links {
            let _ = writeln!(s, "- {title}: [{stem}.svg]({stem}.svg); PNG: `{stem}.png`");
        }
        s.push('\n');
    }
}

fn config_table(s: &mut String, g: &HardwareGroup, w: &str, v: &str, spec: Option<&WorkloadSpec>) {
    let configs: Vec<&ConfigSummary> = g.configs_of(w, v).collect();
    let reference = configs
        .iter()
        .find(|c| c.entry_kind == "reference")
        .map_or("reference".to_string(), |c| c.entry.clone());
    let figures: Vec<(&str, &str)> = match spec {
        Some(sp) => sp
            .figures
            .iter()
            .filter(|f| configs.iter().any(|c| c.figures.contains_key(f.key)))
            .map(|f| (f.key, f.label))
            .collect(),
        None => Vec::new(),
    };
    // Other paired ratios the workload declares, where its baseline ran.
    let comparisons: Vec<&Comparison> = spec
        .map_or(&[][..], |sp| sp.comparisons)
        .iter()
        .filter(|cmp| configs.iter().any(|c| c.entry == cmp.baseline))
        .collect();
    let _ = write!(
        s,
        "| entry | params | median time-to-result (s) | 95% CI (s) | reached | speedup vs {reference} | 95% CI | quality |"
    );
    for cmp in &comparisons {
        let _ = write!(s, " {} (95% CI) |", cmp.label);
    }
    for (_, label) in &figures {
        let _ = write!(s, " {label} |");
    }
    let _ = write!(s, "\n|---|---|---|---|---|---|---|---|");
    for _ in 0..comparisons.len() + figures.len() {
        s.push_str("---|");
    }
    s.push('\n');
    for c in &configs {
        let (sp, sp_ci) = match &c.speedup {
            Some(sp) => (
                fmt_ratio(sp.median),
                format!("{} – {}", fmt_ratio(sp.lo), fmt_ratio(sp.hi)),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = write!(
            s,
            "| {} | {} | {} | {} – {} | {}/{} | {} | {} | {} |",
            c.entry,
            if c.params.is_empty() { "-" } else { &c.params },
            fmt_time(c.median_s),
            fmt_time(c.ci_s.0),
            fmt_time(c.ci_s.1),
            c.successes,
            c.trials,
            sp,
            sp_ci,
            c.quality_median.map_or("-".into(), fmt_num),
        );
        for cmp in &comparisons {
            let cell = configs
                .iter()
                .find(|b| {
                    b.entry == cmp.baseline && cmp.same.iter().all(|p| b.param(p) == c.param(p))
                })
                .and_then(|b| paired_speedup(b, c))
                .map_or("-".into(), |sp| {
                    format!(
                        "{} ({} – {})",
                        fmt_ratio(sp.median),
                        fmt_ratio(sp.lo),
                        fmt_ratio(sp.hi)
                    )
                });
            let _ = write!(s, " {cell} |");
        }
        for (key, _) in &figures {
            let _ = write!(
                s,
                " {} |",
                c.figures.get(*key).map_or("-".into(), |v| fmt_num(*v))
            );
        }
        s.push('\n');
    }
    let failures: Vec<&&ConfigSummary> = configs.iter().filter(|c| c.failure.is_some()).collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nMisses:\n");
        for c in failures {
            let _ = writeln!(s, "- {}: {}", c.label(), c.failure.as_deref().unwrap_or(""));
        }
    }
    s.push('\n');
}

fn profile_table(s: &mut String, p: &ProfileSummary) {
    let _ = writeln!(
        s,
        "Problems: {}. Score B = area under rho(tau) for tau in [1, 4], divided by 3 (1 = fastest everywhere, 0 = never within 4x of the fastest).\n",
        p.profile.problems.join(", ")
    );
    let _ = writeln!(
        s,
        "| entry | B | geometric-mean speedup vs reference | problems |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for (i, m) in p.profile.methods.iter().enumerate() {
        let (gm, n) = match p.geomean_speedup[i] {
            Some((g, n)) => (fmt_ratio(g), n),
            None => ("-".into(), 0),
        };
        let _ = writeln!(s, "| {m} | {:.3} | {gm} | {n} |", p.profile.score[i]);
    }
    s.push('\n');
}

/// Seconds with three significant digits; infinity is a miss.
pub fn fmt_time(t: f64) -> String {
    if t.is_infinite() {
        "miss".into()
    } else if t.is_nan() {
        "-".into()
    } else {
        fmt_num(t)
    }
}

pub fn fmt_ratio(r: f64) -> String {
    if r.is_infinite() {
        "inf".into()
    } else {
        format!("{}x", fmt_num(r))
    }
}

/// Three significant digits, plain notation from 1e-3 to 1e6.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".into();
    }
    let mag = x.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{x:.2e}");
    }
    let decimals = (2 - mag).max(0) as usize;
    format!("{x:.decimals$}")
}

fn ttr_chart(g: &HardwareGroup, w: &str, v: &str) -> DotChart {
    DotChart {
        title: format!("Time-to-result: {w} / {v} (median, 95% CI)"),
        x_label: "time-to-result (s)".into(),
        log_x: true,
        rows: g
            .configs_of(w, v)
            .map(|c| DotRow {
                label: c.label(),
                value: c.median_s,
                lo: c.ci_s.0,
                hi: c.ci_s.1,
                note: format!("{}/{}", c.successes, c.trials),
            })
            .collect(),
    }
}

fn coordinate(c: &ConfigSummary, source: Source) -> Option<f64> {
    match source {
        Source::Param(p) => c.param(p),
        Source::Figure(f) => c.figures.get(f).copied(),
        Source::TimeToResult => Some(c.median_s),
        Source::Speedup => c.speedup.as_ref().map(|s| s.median),
    }
    .filter(|x| x.is_finite())
}

fn param_names(params: &str) -> Vec<String> {
    params
        .split(',')
        .filter_map(|kv| kv.split_once('=').map(|(n, _)| n.to_string()))
        .collect()
}

/// A declared chart, built from records, in the model its renderer takes.
#[derive(Debug, Clone, PartialEq)]
enum SpecChart {
    Line(LineChart),
    Heat(HeatChart),
    Pareto(ParetoChart),
}

/// A configuration's label on a chart: the entry and its parameters, less
/// those the chart fixes with `only` (the same on every configuration).
fn config_label(c: &ConfigSummary, chart: &Chart) -> String {
    let params = c
        .params
        .split(',')
        .filter(|kv| {
            kv.split_once('=')
                .is_some_and(|(n, _)| !chart.only.iter().any(|&(p, _)| p == n))
        })
        .collect::<Vec<_>>()
        .join(",");
    if params.is_empty() {
        c.entry.clone()
    } else {
        format!("{} {params}", c.entry)
    }
}

/// The figure key of one heat-map cell: `{row}` and `{col}` in `template`
/// replaced by the values in their shortest form (`1024`, `50`, `0.5`),
/// which is how `f64` displays and how records write parameters.
fn heat_key(template: &str, row: f64, col: f64) -> String {
    template
        .replace("{row}", &row.to_string())
        .replace("{col}", &col.to_string())
}

/// One panel per configuration with at least one finite cell; `None` when
/// no configuration has one (the variant does not record these figures).
fn heat_chart(
    configs: &[&ConfigSummary],
    chart: &Chart,
    title: String,
    (rows, cols, key): (&[f64], &[f64], &str),
) -> Option<HeatChart> {
    let panels: Vec<HeatPanel> = configs
        .iter()
        .map(|c| HeatPanel {
            label: config_label(c, chart),
            cells: rows
                .iter()
                .map(|&r| {
                    cols.iter()
                        .map(|&k| {
                            c.figures
                                .get(&heat_key(key, r, k))
                                .copied()
                                .filter(|v| v.is_finite())
                        })
                        .collect()
                })
                .collect(),
        })
        .filter(|p| p.cells.iter().flatten().any(Option::is_some))
        .collect();
    (!panels.is_empty()).then(|| HeatChart {
        title,
        x_label: chart.x_label.into(),
        y_label: chart.y_label.into(),
        rows: rows.to_vec(),
        cols: cols.to_vec(),
        panels,
    })
}

/// One group per entry, its configurations in record (parameter) order; a
/// configuration without a finite coordinate is kept as NaN, so that the
/// renderer counts it in its caption. `None` when no configuration has
/// both coordinates.
fn pareto_chart(
    configs: &[&ConfigSummary],
    chart: &Chart,
    title: String,
    (x_higher_better, y_higher_better): (bool, bool),
) -> Option<ParetoChart> {
    let mut groups: Vec<ScatterGroup> = Vec::new();
    let mut any = false;
    for c in configs {
        let (x, y) = (coordinate(c, chart.x), coordinate(c, chart.y));
        any |= x.is_some() && y.is_some();
        let point = ScatterPoint {
            label: config_label(c, chart),
            x: x.unwrap_or(f64::NAN),
            y: y.unwrap_or(f64::NAN),
        };
        match groups.iter_mut().find(|g| g.label == c.entry) {
            Some(g) => g.points.push(point),
            None => groups.push(ScatterGroup {
                label: c.entry.clone(),
                points: vec![point],
            }),
        }
    }
    any.then(|| ParetoChart {
        title,
        x_label: chart.x_label.into(),
        y_label: chart.y_label.into(),
        log_x: chart.log_x,
        log_y: chart.log_y,
        x_higher_better,
        y_higher_better,
        groups,
    })
}

/// Builds a declared chart for one variant; `None` if it has no data there.
fn spec_chart(g: &HardwareGroup, w: &str, v: &str, chart: &Chart) -> Option<SpecChart> {
    let configs: Vec<&ConfigSummary> = g
        .configs_of(w, v)
        .filter(|c| chart.entries.is_empty() || chart.entries.contains(&c.entry.as_str()))
        .filter(|c| chart.only.iter().all(|&(p, v)| c.param(p) == Some(v)))
        .collect();
    let title = format!("{}: {w} / {v}", chart.title);
    let mut lines: Vec<Line> = Vec::new();
    let mut push = |label: String, dashed: bool, x: f64, y: f64| match lines
        .iter_mut()
        .find(|l| l.label == label)
    {
        Some(l) => l.points.push(Point {
            x,
            y,
            lo: None,
            hi: None,
        }),
        None => lines.push(Line {
            label,
            points: vec![Point {
                x,
                y,
                lo: None,
                hi: None,
            }],
            dashed,
            step: false,
        }),
    };
    match chart.series {
        Series::Heat { rows, cols, key } => {
            return heat_chart(&configs, chart, title, (rows, cols, key)).map(SpecChart::Heat);
        }
        Series::Pareto {
            x_higher_better,
            y_higher_better,
        } => {
            return pareto_chart(&configs, chart, title, (x_higher_better, y_higher_better))
                .map(SpecChart::Pareto);
        }
        Series::Param(param) => {
            for c in &configs {
                let (Some(x), Some(y)) = (coordinate(c, chart.x), coordinate(c, chart.y)) else {
                    continue;
                };
                let group = c
                    .param(param)
                    .map_or("all".to_string(), |p| format!("{param}={p}"));
                push(group.clone(), false, x, y);
                if let Some(t) = chart.theory.and_then(|f| c.figures.get(f)) {
                    push(format!("{group} closed form"), true, x, *t);
                }
            }
        }
        Series::Entries => {
            // Parameters that vary among these configurations, other than
            // the x axis, split an entry into several lines.
            let x_param = match chart.x {
                Source::Param(p) => Some(p),
                _ => None,
            };
            let varying: Vec<String> = configs
                .iter()
                .flat_map(|c| param_names(&c.params))
                .filter(|n| Some(n.as_str()) != x_param)
                .filter(|n| {
                    let mut vals = configs.iter().filter_map(|c| c.param(n));
                    let first = vals.next();
                    vals.any(|v| Some(v) != first)
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for c in &configs {
                let (Some(x), Some(y)) = (coordinate(c, chart.x), coordinate(c, chart.y)) else {
                    continue;
                };
                let mut label = c.entry.clone();
                for n in &varying {
                    if let Some(v) = c.param(n) {
                        label.push_str(&format!(" {n}={v}"));
                    }
                }
                push(label, false, x, y);
            }
        }
        Series::Curve(points) => {
            for c in &configs {
                let label = config_label(c, chart);
                for &(level, key) in points {
                    if let Some(y) = c.figures.get(key).filter(|y| y.is_finite()) {
                        push(label.clone(), false, level, *y);
                    }
                }
            }
        }
        Series::Figures(figs) => {
            for c in &configs {
                let Some(x) = coordinate(c, chart.x) else {
                    continue;
                };
                for (label, key) in figs {
                    if let Some(y) = c.figures.get(*key).filter(|y| y.is_finite()) {
                        push(label.to_string(), false, x, *y);
                    }
                }
            }
        }
    }
    for l in &mut lines {
        l.points.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    if lines.is_empty() {
        return None;
    }
    Some(SpecChart::Line(LineChart {
        title,
        x_label: chart.x_label.into(),
        y_label: chart.y_label.into(),
        log_x: chart.log_x,
        log_y: chart.log_y,
        lines,
        y_range: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_with_three_significant_digits() {
        assert_eq!(fmt_num(0.012345), "0.0123");
        assert_eq!(fmt_num(1.5), "1.50");
        assert_eq!(fmt_num(123.456), "123");
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(2.5e-5), "2.50e-5");
        assert_eq!(fmt_time(f64::INFINITY), "miss");
        assert_eq!(fmt_ratio(2.0), "2.00x");
        assert_eq!(short_commit("0123456789abcdef-dirty"), "0123456789-dirty");
    }

    fn config(entry: &str, params: &str, median_s: f64, figures: &[(&str, f64)]) -> ConfigSummary {
        ConfigSummary {
            workload: "long-context".into(),
            workload_version: 1,
            variant: "needle".into(),
            entry: entry.into(),
            entry_kind: if entry == "dense" {
                "reference"
            } else {
                "method"
            }
            .into(),
            params: params.into(),
            times: vec![median_s],
            seeds: vec![1],
            median_s,
            ci_s: (median_s, median_s),
            successes: usize::from(median_s.is_finite()),
            trials: 1,
            speedup: None,
            figures: figures.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            quality_median: None,
            target: 0.9,
            failure: None,
        }
    }

    fn group(configs: Vec<ConfigSummary>) -> HardwareGroup {
        HardwareGroup {
            hardware_id: "hw".into(),
            configs,
            profiles: Vec::new(),
            suite_profile: None,
        }
    }

    fn chart(series: Series) -> Chart {
        Chart {
            id: "c",
            title: "Chart",
            x: Source::TimeToResult,
            x_label: "time-to-result (s)",
            y: Source::Figure("accuracy"),
            y_label: "exact match",
            series,
            entries: &[],
            theory: None,
            log_x: false,
            log_y: false,
            only: &[],
        }
    }

    #[test]
    fn heat_keys_use_the_shortest_form_of_each_value() {
        assert_eq!(heat_key("acc_c{row}_d{col}", 1024.0, 50.0), "acc_c1024_d50");
        assert_eq!(heat_key("acc_c{row}_d{col}", 0.5, 0.0), "acc_c0.5_d0");
        assert_eq!(heat_key("d{col}_c{row}_{row}", 2.0, 12.5), "d12.5_c2_2");
        assert_eq!(heat_key("plain", 1.0, 2.0), "plain");
    }

    #[test]
    fn heat_chart_reads_one_panel_per_configuration() {
        let g = group(vec![
            config(
                "dense",
                "dtype=32",
                2.0,
                &[
                    ("acc_c1024_d0", 1.0),
                    ("acc_c1024_d50", 0.5),
                    ("acc_c2048_d0", 0.75),
                ],
            ),
            config(
                "quest",
                "dtype=32,budget=0.25",
                1.0,
                &[("acc_c2048_d50", 0.25), ("acc_c2048_d100", f64::NAN)],
            ),
            // Nothing recorded for the grid: no panel.
            config("quest", "dtype=32,budget=0.5", 1.0, &[("accuracy", 0.9)]),
            // Left out by `only`.
            config(
                "quest",
                "dtype=16,budget=0.25",
                1.0,
                &[("acc_c1024_d0", 0.1)],
            ),
        ]);
        let mut c = chart(Series::Heat {
            rows: &[1024.0, 2048.0],
            cols: &[0.0, 50.0, 100.0],
            key: "acc_c{row}_d{col}",
        });
        c.only = &[("dtype", 32.0)];
        let Some(SpecChart::Heat(h)) = spec_chart(&g, "long-context", "needle", &c) else {
            panic!("expected a heat chart")
        };
        assert_eq!(h.title, "Chart: long-context / needle");
        assert_eq!(
            (h.x_label.as_str(), h.y_label.as_str()),
            ("time-to-result (s)", "exact match")
        );
        assert_eq!(
            (h.rows, h.cols),
            (vec![1024.0, 2048.0], vec![0.0, 50.0, 100.0])
        );
        let labels: Vec<&str> = h.panels.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["dense", "quest budget=0.25"]);
        assert_eq!(
            h.panels[0].cells,
            vec![
                vec![Some(1.0), Some(0.5), None],
                vec![Some(0.75), None, None]
            ]
        );
        assert_eq!(
            h.panels[1].cells,
            vec![vec![None, None, None], vec![None, Some(0.25), None]]
        );
        // Another variant without these figures gets no chart.
        let none = group(vec![config("dense", "", 1.0, &[("accuracy", 1.0)])]);
        assert_eq!(spec_chart(&none, "long-context", "needle", &c), None);
    }

    #[test]
    fn pareto_chart_groups_configurations_by_entry() {
        let g = group(vec![
            config("dense", "", 4.0, &[("accuracy", 1.0)]),
            config("quest", "budget=0.1", 1.0, &[("accuracy", 0.6)]),
            config("streaming", "budget=0.1", 0.5, &[("accuracy", 0.2)]),
            config("quest", "budget=0.5", 2.0, &[("accuracy", 0.95)]),
            // A miss: infinite time, kept as NaN for the renderer to count.
            config(
                "streaming",
                "budget=0.5",
                f64::INFINITY,
                &[("accuracy", 0.9)],
            ),
        ]);
        let c = chart(Series::Pareto {
            x_higher_better: false,
            y_higher_better: true,
        });
        let Some(SpecChart::Pareto(p)) = spec_chart(&g, "long-context", "needle", &c) else {
            panic!("expected a Pareto chart")
        };
        assert!(!p.x_higher_better && p.y_higher_better);
        type Group<'a> = (&'a str, Vec<(&'a str, f64, f64)>);
        let groups: Vec<Group> = p
            .groups
            .iter()
            .map(|g| {
                let pts = g
                    .points
                    .iter()
                    .map(|q| (q.label.as_str(), q.x, q.y))
                    .collect();
                (g.label.as_str(), pts)
            })
            .collect();
        assert_eq!(groups[0], ("dense", vec![("dense", 4.0, 1.0)]));
        assert_eq!(
            groups[1],
            (
                "quest",
                vec![
                    ("quest budget=0.1", 1.0, 0.6),
                    ("quest budget=0.5", 2.0, 0.95)
                ]
            )
        );
        assert_eq!(groups[2].0, "streaming");
        assert_eq!(groups[2].1[0], ("streaming budget=0.1", 0.5, 0.2));
        assert!(groups[2].1[1].1.is_nan() && groups[2].1[1].2 == 0.9);
        // Without a single finite pair there is no chart.
        let misses = group(vec![config(
            "dense",
            "",
            f64::INFINITY,
            &[("accuracy", 1.0)],
        )]);
        assert_eq!(spec_chart(&misses, "long-context", "needle", &c), None);
    }

    #[test]
    fn comparison_column_pairs_each_config_with_its_baseline_at_the_same_parameter() {
        static SPEC: WorkloadSpec = WorkloadSpec {
            comparisons: &[Comparison {
                baseline: "quest",
                same: &["budget"],
                label: "vs quest, same budget",
            }],
            ..DECLARED
        };
        let g = group(vec![
            config("dense", "", 8.0, &[]),
            config("quest", "budget=0.25", 4.0, &[]),
            config("quest", "budget=0.5", 6.0, &[]),
            config("cluster", "k=2,budget=0.25", 2.0, &[]),
            config("cluster", "k=2,budget=0.5", 12.0, &[]),
            config("cluster", "k=2,budget=0.75", 1.0, &[]),
        ]);
        let mut s = String::new();
        config_table(&mut s, &g, "long-context", "needle", Some(&SPEC));
        let cells = |label: &str| -> String {
            let row = s
                .lines()
                .find(|l| l.starts_with(&format!("| {label} ")))
                .unwrap_or_else(|| panic!("no row {label} in\n{s}"));
            row.split('|').nth(9).unwrap().trim().to_string()
        };
        assert!(s
            .lines()
            .next()
            .unwrap()
            .contains("| vs quest, same budget (95% CI) |"));
        assert_eq!(cells("quest | budget=0.25"), "1.00x (1.00x – 1.00x)");
        assert_eq!(cells("cluster | k=2,budget=0.25"), "2.00x (2.00x – 2.00x)");
        assert_eq!(
            cells("cluster | k=2,budget=0.5"),
            "0.500x (0.500x – 0.500x)"
        );
        // No baseline at that budget, and none for the reference.
        assert_eq!(cells("cluster | k=2,budget=0.75"), "-");
        assert_eq!(cells("dense | -"), "-");
    }

    /// A registry of one workload that declares a heat map and a Pareto
    /// chart, for [`write_report`] (it never runs: `load` fails).
    struct Declared;

    static DECLARED: WorkloadSpec = WorkloadSpec {
        id: "long-context",
        version: 1,
        title: "declared charts",
        summary: "",
        papers: &[],
        metric: workloads::Metric {
            name: "accuracy",
            description: "exact match",
            direction: workloads::Direction::HigherIsBetter,
        },
        variants: &[],
        entries: &[],
        figures: &[],
        comparisons: &[],
        charts: &[
            Chart {
                id: "needle-grid",
                title: "Needle accuracy",
                x: Source::TimeToResult,
                x_label: "needle depth (%)",
                y: Source::TimeToResult,
                y_label: "context (tokens)",
                series: Series::Heat {
                    rows: &[1024.0, 2048.0],
                    cols: &[0.0, 50.0],
                    key: "acc_c{row}_d{col}",
                },
                entries: &[],
                theory: None,
                log_x: false,
                log_y: false,
                only: &[],
            },
            Chart {
                id: "front",
                title: "Accuracy against time",
                x: Source::TimeToResult,
                x_label: "time-to-result (s)",
                y: Source::Figure("accuracy"),
                y_label: "exact match",
                series: Series::Pareto {
                    x_higher_better: false,
                    y_higher_better: true,
                },
                entries: &[],
                theory: None,
                log_x: false,
                log_y: false,
                only: &[],
            },
        ],
        claims: &[],
    };

    impl workloads::Workload for Declared {
        fn spec(&self) -> &'static WorkloadSpec {
            &DECLARED
        }

        fn load(
            &self,
            _: &workloads::LoadContext<'_>,
        ) -> Result<Box<dyn workloads::Loaded>, workloads::WorkloadError> {
            Err(workloads::WorkloadError::Config(
                "only declares charts".into(),
            ))
        }
    }

    #[test]
    fn heat_and_pareto_charts_are_written_with_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let cells = [("acc_c1024_d0", 1.0), ("acc_c2048_d50", 0.5)];
        let g = group(vec![
            config(
                "dense",
                "",
                4.0,
                &[&cells[..], &[("accuracy", 1.0)]].concat(),
            ),
            config(
                "quest",
                "budget=0.1",
                1.0,
                &[&cells[1..], &[("accuracy", 0.6)]].concat(),
            ),
            config("quest", "budget=0.5", 3.0, &[("accuracy", 0.5)]),
        ]);
        let input = ReportInput {
            groups: &[g],
            runs: &[],
            registry: &[&Declared],
        };
        let written = write_report(&input, dir.path()).unwrap();
        let read = |name: &str| {
            let path = dir.path().join("charts").join(name);
            assert!(written.contains(&path), "{name} not written");
            std::fs::read_to_string(&path).unwrap_or_default()
        };
        let heat = read("long-context-needle-needle-grid.svg");
        assert!(heat.contains("Needle accuracy: long-context / needle"));
        assert!(heat.contains("quest budget=0.1") && heat.contains("dense"));
        // quest budget=0.5 records no cell: no panel.
        assert!(!heat.contains("budget=0.5"));
        assert!(heat.contains("Hatched grey cells: no finite value recorded (5 of 8)."));
        let front = read("long-context-needle-front.svg");
        assert!(front.contains("Pareto front"));
        assert!(front.contains("On the front: quest budget=0.1, dense."));
        for png in ["needle-grid", "front"] {
            read(&format!("long-context-needle-{png}.png"));
        }
        let summary = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(summary
            .contains("needle: Needle accuracy: [charts/long-context-needle-needle-grid.svg]"));
        assert!(summary
            .contains("needle: Accuracy against time: [charts/long-context-needle-front.svg]"));
    }
}
