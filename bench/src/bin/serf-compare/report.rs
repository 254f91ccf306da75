//! The results file, the Markdown tables (one per cluster size, Serf's
//! figure, ours and the ratio) and the charts.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::measure::{Dissemination, LossRun, Plan, Run};

/// Everything one run of the harness measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// The command that produced it.
    pub command: String,
    /// The parameters.
    pub plan: PlanInfo,
    /// One per (system, size), in the order they ran.
    pub runs: Vec<Run>,
    /// The loss phase, one per (system, size).
    pub loss: Vec<LossRun>,
    /// Length of the whole run.
    pub seconds: f64,
}

/// The machine and the versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// `serf version`, first line.
    pub serf: String,
    /// `rumormill --version`.
    pub rumormill: String,
}

impl Machine {
    /// Reads the machine's description.
    pub fn read(serf: &Path, rumormill: &Path) -> Machine {
        let file = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let first_line = |bin: &Path, arg: &str| {
            std::process::Command::new(bin)
                .arg(arg)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default()
        };
        let cpuinfo = file("/proc/cpuinfo");
        let meminfo = file("/proc/meminfo");
        Machine {
            cpu: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or("unknown")
                .trim()
                .to_string(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
                .map_or(0.0, |k| k / 1024.0 / 1024.0),
            kernel: file("/proc/sys/kernel/osrelease").trim().to_string(),
            serf: first_line(serf, "version"),
            rumormill: first_line(rumormill, "--version"),
        }
    }
}

/// The parameters, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanInfo {
    /// Events per dissemination phase.
    pub events: u32,
    /// Events per second.
    pub rate: f64,
    /// Payload bytes.
    pub payload: usize,
    /// Kills per run.
    pub kills: usize,
    /// Seconds between kills.
    pub kill_spacing_s: f64,
    /// Idle window, seconds.
    pub idle_s: f64,
    /// Loss phase: percent and seconds.
    pub loss_percent: f64,
    /// Loss phase length.
    pub loss_s: f64,
}

impl PlanInfo {
    /// From the plan and the arguments.
    pub fn from_plan(plan: &Plan, args: &crate::Args) -> PlanInfo {
        PlanInfo {
            events: plan.events,
            rate: args.rate,
            payload: crate::cluster::PAYLOAD,
            kills: plan.kills,
            kill_spacing_s: plan.kill_spacing.as_secs_f64(),
            idle_s: plan.idle.as_secs_f64(),
            loss_percent: args.loss_percent,
            loss_s: args.loss_s,
        }
    }
}

/// Reads a results file.
pub fn load(path: &Path) -> Result<Results> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// Prints the tables and draws the charts.
pub fn write(r: &Results, img_dir: &Path) -> Result<()> {
    println!("{}", markdown(r));
    std::fs::create_dir_all(img_dir)?;
    latency_chart(r, &img_dir.join("serf-latency-cdf.svg"))?;
    detection_chart(r, &img_dir.join("serf-detection.svg"))?;
    bandwidth_chart(r, &img_dir.join("serf-bandwidth.svg"))?;
    Ok(())
}

fn sizes(r: &Results) -> Vec<usize> {
    let mut s: Vec<usize> = r.runs.iter().map(|r| r.n).collect();
    s.sort_unstable();
    s.dedup();
    s
}

fn find<'a>(r: &'a Results, system: &str, n: usize) -> Option<&'a Run> {
    r.runs.iter().find(|x| x.system == system && x.n == n)
}

/// One table row: a figure per system, lower is better unless told.
struct Row {
    label: String,
    values: Vec<Option<f64>>,
    digits: usize,
    ratio: bool,
    /// Shown for an infinite value (never reached, not within the limit).
    none: &'static str,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn detections(run: &Run) -> Vec<f64> {
    run.detection.iter().filter_map(|d| d.all_s).collect()
}

fn rss_mib(run: &Run) -> Vec<f64> {
    run.rss_kib.iter().map(|&k| k as f64 / 1024.0).collect()
}

/// The Markdown of the "Against Serf" tables.
pub fn markdown(r: &Results) -> String {
    let systems: Vec<&str> = ["serf", "rumormill", "rumormill-tuned"]
        .into_iter()
        .filter(|s| r.runs.iter().any(|x| x.system == *s))
        .collect();
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "Machine: {} ({} CPUs), {:.0} GiB, Linux {}; {}, {}. Whole run {:.0} s.\n",
        m.cpu, m.cpus, m.memory_gib, m.kernel, m.serf, m.rumormill, r.seconds
    );
    for n in sizes(r) {
        let runs: Vec<Option<&Run>> = systems.iter().map(|s| find(r, s, n)).collect();
        let each = |f: &dyn Fn(&Run) -> Option<f64>| runs.iter().map(|x| x.and_then(f)).collect::<Vec<_>>();
        // Serf's single mode against each of ours.
        fn phase<'a>(run: &'a Run, mode: &str) -> Option<&'a Dissemination> {
            if run.system == "serf" {
                run.dissemination.first()
            } else {
                run.dissemination.iter().find(|d| d.mode == mode)
            }
        }
        // Not reached by every member: infinitely late.
        let dis = |mode: &'static str, q: f64| {
            move |run: &Run| Some(phase(run, mode)?.quantile_ms(q).unwrap_or(f64::INFINITY))
        };
        let per_event = |mode: &'static str| move |run: &Run| Some(phase(run, mode)?.bytes_per_event);
        let delivered = |mode: &'static str| move |run: &Run| Some(phase(run, mode)?.latency_ms.len() as f64);
        let loss = |run: &Run| {
            r.loss
                .iter()
                .find(|l| l.system == run.system && l.n == run.n)
                .map(|l| l.false_failures as f64)
        };
        let mut rows = vec![Row {
            label: "join convergence, s".into(),
            values: each(&|x| Some(x.converge_s.unwrap_or(f64::INFINITY))),
            digits: 2,
            ratio: true,
            none: "> 10",
        }];
        for mode in ["best effort", "at-least-once"] {
            for (q, name) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
                rows.push(Row {
                    label: format!("dissemination {name}, ms ({mode})"),
                    values: each(&dis(mode, q)),
                    digits: 1,
                    ratio: true,
                    none: "never",
                });
            }
            rows.push(Row {
                label: format!("events reaching all {n} ({mode})"),
                values: each(&delivered(mode)),
                digits: 0,
                ratio: false,
                none: "–",
            });
            rows.push(Row {
                label: format!("bytes per event ({mode})"),
                values: each(&per_event(mode)),
                digits: 0,
                ratio: true,
                none: "–",
            });
        }
        rows.extend([
            Row {
                label: format!("failure detection, mean of {}, s", r.plan.kills),
                values: each(&|x| mean(&detections(x))),
                digits: 2,
                ratio: true,
                none: "–",
            },
            Row {
                label: "failure detection, slowest, s".into(),
                values: each(&|x| max(&detections(x))),
                digits: 2,
                ratio: true,
                none: "–",
            },
            Row {
                label: format!(
                    "false failures, {:.0} % loss for {:.0} s",
                    r.plan.loss_percent, r.plan.loss_s
                ),
                values: each(&loss),
                digits: 0,
                ratio: false,
                none: "–",
            },
            Row {
                label: "false failures, no loss".into(),
                values: each(&|x| Some(x.false_failures as f64)),
                digits: 0,
                ratio: false,
                none: "–",
            },
            Row {
                label: "idle, bytes per member per s".into(),
                values: each(&|x| Some(x.idle.bytes_per_member_s())),
                digits: 0,
                ratio: true,
                none: "–",
            },
            Row {
                label: "idle, packets per member per s".into(),
                values: each(&|x| Some(x.idle.packets_per_member_s())),
                digits: 1,
                ratio: true,
                none: "–",
            },
            Row {
                label: "during dissemination, bytes per member per s".into(),
                values: each(&|x| x.dissemination.first().map(|d| d.traffic.bytes_per_member_s())),
                digits: 0,
                ratio: true,
                none: "–",
            },
            Row {
                label: "during dissemination, packets per member per s".into(),
                values: each(&|x| x.dissemination.first().map(|d| d.traffic.packets_per_member_s())),
                digits: 1,
                ratio: true,
                none: "–",
            },
            Row {
                label: "peak RSS per agent, mean, MiB".into(),
                values: each(&|x| mean(&rss_mib(x))),
                digits: 1,
                ratio: true,
                none: "–",
            },
            Row {
                label: "peak RSS per agent, max, MiB".into(),
                values: each(&|x| max(&rss_mib(x))),
                digits: 1,
                ratio: true,
                none: "–",
            },
        ]);
        let _ = writeln!(out, "#### {n} members\n");
        let mut header = "| | Serf |".to_string();
        let mut rule = "|---|---:|".to_string();
        for s in &systems[1..] {
            let _ = write!(header, " {} | Serf ÷ {} |", title(s), title(s));
            rule.push_str("---:|---:|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for row in rows {
            let fmt = |v: Option<f64>| match v {
                Some(v) if v.is_finite() => format!("{v:.*}", row.digits),
                Some(_) => row.none.into(),
                None => "–".into(),
            };
            let mut line = format!("| {} | {} |", row.label, fmt(row.values[0]));
            for v in &row.values[1..] {
                let ratio = match (row.ratio, row.values[0], *v) {
                    (true, Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}×", a / b),
                    _ => "".into(),
                };
                let _ = write!(line, " {} | {} |", fmt(*v), ratio);
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out);
    }
    out
}

fn title(system: &str) -> &'static str {
    match system {
        "serf" => "Serf",
        "rumormill" => "Rumormill",
        _ => "Rumormill tuned",
    }
}

const SERF: RGBColor = RGBColor(200, 60, 50);
const OURS: RGBColor = RGBColor(40, 90, 200);
const OURS_ALO: RGBColor = RGBColor(30, 150, 80);
const TUNED: RGBColor = RGBColor(130, 80, 190);

fn color(system: &str) -> RGBColor {
    match system {
        "serf" => SERF,
        "rumormill" => OURS,
        _ => TUNED,
    }
}

/// Latency CDFs, one panel per size.
fn latency_chart(r: &Results, path: &Path) -> Result<()> {
    let sizes = sizes(r);
    let root = SVGBackend::new(path, (420 * sizes.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, sizes.len()));
    let all: Vec<f64> = r
        .runs
        .iter()
        .flat_map(|x| x.dissemination.iter().flat_map(|d| d.latency_ms.clone()))
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.05) * 0.8;
    let hi = all.iter().copied().fold(0.0, f64::max).max(1.0) * 1.3;
    for (panel, n) in panels.iter().zip(sizes) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{n} members: time until every member has the event"),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(45)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("ms after publishing (log)")
            .y_desc("fraction of events")
            .label_style(("sans-serif", 12))
            .draw()?;
        for run in r.runs.iter().filter(|x| x.n == n) {
            for d in &run.dissemination {
                let c = match (run.system.as_str(), d.mode.as_str()) {
                    ("serf", _) => SERF,
                    ("rumormill", "best effort") => OURS,
                    ("rumormill", _) => OURS_ALO,
                    (_, "best effort") => TUNED,
                    _ => RGBColor(200, 140, 30),
                };
                let total = d.events as f64;
                let points: Vec<(f64, f64)> = d
                    .latency_ms
                    .iter()
                    .enumerate()
                    .map(|(i, &ms)| (ms, (i + 1) as f64 / total))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points, c.stroke_width(2)))?
                    .label(if run.system == "serf" {
                        "Serf (serf event)".to_string()
                    } else {
                        format!("{} {}", title(&run.system), d.mode)
                    })
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The systems of a run, in the order they ran.
fn systems(r: &Results) -> Vec<String> {
    let mut s: Vec<String> = Vec::new();
    for run in &r.runs {
        if !s.contains(&run.system) {
            s.push(run.system.clone());
        }
    }
    s
}

/// Where system `s` of `count` draws its bar for size `i`, and how wide.
fn bar_x(i: usize, s: usize, count: usize) -> (f64, f64) {
    let width = 0.8 / count as f64;
    (i as f64 - 0.4 + width * (s as f64 + 0.5), width)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Caption, axis and bar style of [`size_bars`].
struct Look<'s> {
    caption: &'s str,
    y_desc: &'s str,
    /// Top of the axis.
    y_max: f64,
    /// Pale bars, leaving room for dots on top.
    faded: bool,
}

/// A chart with one group of bars per cluster size, one bar per system:
/// `metric` of its run.
fn size_bars<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    r: &Results,
    look: Look<'_>,
    metric: &dyn Fn(&Run) -> Option<f64>,
    label: &dyn Fn(&str) -> String,
) -> Result<Chart<'a, 'b>> {
    let sizes = sizes(r);
    let systems = systems(r);
    let mut chart = ChartBuilder::on(area)
        .caption(look.caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..sizes.len() as f64 - 0.5, 0.0..look.y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(sizes.len())
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            sizes.get(i).map(|n| format!("{n} members")).unwrap_or_default()
        })
        .y_desc(look.y_desc)
        .label_style(("sans-serif", 12))
        .draw()?;
    for (s, system) in systems.iter().enumerate() {
        let c = color(system);
        let style = if look.faded { c.mix(0.35).filled() } else { c.filled() };
        let bars: Vec<Rectangle<(f64, f64)>> = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, &n)| {
                let v = metric(find(r, system, n)?)?;
                let (x, width) = bar_x(i, s, systems.len());
                Some(Rectangle::new([(x - width * 0.42, 0.0), (x + width * 0.42, v)], style))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(label(system))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    Ok(chart)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

/// Detection time of every kill, per system and size.
fn detection_chart(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let look = Look {
        caption: "Failure detection: SIGKILL until every survivor reports it failed",
        y_desc: "seconds",
        y_max: r.runs.iter().flat_map(detections).fold(1.0, f64::max) * 1.15,
        faded: true,
    };
    let mut chart = size_bars(&root, r, look, &|run| mean(&detections(run)), &|system| {
        format!("{} (bar: mean, dots: each kill)", title(system))
    })?;
    let (sizes, systems) = (sizes(r), systems(r));
    for (s, system) in systems.iter().enumerate() {
        let c = color(system);
        let dots: Vec<Circle<(f64, f64), i32>> = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, &n)| Some((bar_x(i, s, systems.len()).0, find(r, system, n)?)))
            .flat_map(|(x, run)| {
                detections(run)
                    .into_iter()
                    .map(move |v| Circle::new((x, v), 3, c.filled()))
            })
            .collect();
        chart.draw_series(dots)?;
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Bytes per member per second, idle and while events flow.
fn bandwidth_chart(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    type Metric = fn(&Run) -> Option<f64>;
    let metrics: [(&str, Metric); 2] = [
        ("idle", |x| Some(x.idle.bytes_per_member_s())),
        ("while events flow", |x| {
            x.dissemination.first().map(|d| d.traffic.bytes_per_member_s())
        }),
    ];
    for (panel, (name, metric)) in panels.iter().zip(metrics) {
        let look = Look {
            caption: &format!("Gossip bytes per member per second, {name}"),
            y_desc: "bytes / member / s",
            y_max: r.runs.iter().filter_map(metric).fold(1.0, f64::max) * 1.2,
            faded: false,
        };
        let mut chart = size_bars(panel, r, look, &metric, &|system| title(system).to_string())?;
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}
