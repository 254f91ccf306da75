//! `membership-sweep`: the membership experiment of the simulator over a
//! grid of cluster sizes and loss rates, with the SWIM/Lifeguard expectation
//! next to each measurement, written as JSON and drawn as SVG charts.

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rumormill_core::Config;
use rumormill_core::replication::Mode;
use rumormill_sim::membership::{self, MembershipParams, MembershipReport};
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Where the results go by default: the workspace's `docs/`.
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");

/// Membership benchmark: failure detection time, accuracy and traffic in the
/// simulator, for 100, 1,000 and 10,000 members, with and without loss.
#[derive(Debug, Parser)]
#[command(name = "membership-sweep")]
struct Args {
    /// Skip the 10,000-member configurations (6.5–7 GB of memory and
    /// 1.5–5 minutes each).
    #[arg(long)]
    quick: bool,
    /// Only these cluster sizes of the grid (repeat the flag for several).
    #[arg(long = "nodes", value_name = "N")]
    only_nodes: Vec<usize>,
    /// Only these loss rates of the grid, 0 or 0.05 (repeat the flag for
    /// both).
    #[arg(long = "loss", value_name = "P")]
    only_loss: Vec<f64>,
    /// Base push-pull interval in seconds instead of the preset's 30 s (it
    /// is scaled up with the cluster size); a very large value such as 1e9
    /// turns the push-pull exchange off. Use with --json-out and --img-dir so as
    /// not to overwrite the reference results.
    #[arg(long, value_name = "SECONDS")]
    push_pull_s: Option<f64>,
    /// Turn off the dissemination layer's periodic anti-entropy exchange
    /// (on by default even with nothing to spread), to measure its share of
    /// the traffic. Use with --json-out and --img-dir.
    #[arg(long)]
    no_anti_entropy: bool,
    /// Do not simulate: redraw the charts from the existing JSON file.
    #[arg(long)]
    plot_only: bool,
    /// Print a Markdown table of the results on standard error at the end.
    #[arg(long)]
    markdown: bool,
    /// The JSON file with all reports.
    #[arg(long, default_value_t = format!("{DOCS}/benchmarks-membership.json"))]
    json_out: String,
    /// Directory of the SVG charts.
    #[arg(long, default_value_t = format!("{DOCS}/img"))]
    img_dir: String,
}

/// One configuration of the sweep.
struct Case {
    nodes: usize,
    loss: f64,
    duration_s: f64,
    runs: usize,
}

/// Members killed per run, in every configuration.
const KILL: usize = 5;
/// Seed of the first run of every configuration.
const SEED: u64 = 1;

fn cases(quick: bool, only: &[usize], only_loss: &[f64]) -> Vec<Case> {
    let mut out = Vec::new();
    for nodes in [100, 1000, 10_000] {
        if (quick && nodes > 1000) || (!only.is_empty() && !only.contains(&nodes)) {
            continue;
        }
        let (duration_s, runs) = if nodes >= 10_000 { (60.0, 1) } else { (120.0, 3) };
        for loss in [0.0, 0.05] {
            if !only_loss.is_empty() && !only_loss.iter().any(|l| (l - loss).abs() < 1e-9) {
                continue;
            }
            out.push(Case {
                nodes,
                loss,
                duration_s,
                runs,
            });
        }
    }
    out
}

/// What is written per configuration: the simulator's report plus the
/// expectation it is compared with and the wall time it took.
#[derive(Serialize)]
struct Entry {
    #[serde(flatten)]
    report: MembershipReport,
    /// SWIM/Lifeguard expectation of `detect_first_s`: e/(e−1) probe
    /// intervals until the first failed probe plus the minimum suspicion
    /// timeout.
    expected_first_s: f64,
    /// Minimum suspicion timeout for this cluster size.
    suspicion_min_s: f64,
    /// Maximum suspicion timeout (no confirmations) for this cluster size.
    suspicion_max_s: f64,
    /// Push-pull interval for this cluster size.
    push_pull_interval_s: f64,
    /// Whether the dissemination layer's anti-entropy exchange ran.
    anti_entropy: bool,
    /// Wall-clock seconds the configuration took to simulate.
    wall_s: f64,
}

/// The fields the charts and the table need, read back from the JSON.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    nodes: usize,
    loss: f64,
    runs: usize,
    duration_s: f64,
    detect_first_s: Option<f64>,
    detect_all_s: Option<f64>,
    detect_all_max_s: Option<f64>,
    undetected: usize,
    false_positives: usize,
    false_suspicions: usize,
    converged: bool,
    messages_per_member_per_s: f64,
    bytes_per_member_per_s: f64,
    expected_first_s: f64,
    wall_s: f64,
}

/// e/(e−1) probe intervals plus the minimum suspicion timeout for `n`.
fn expected_first_s(config: &Config, n: usize) -> f64 {
    let e = std::f64::consts::E;
    let (min, _) = config.suspicion_timeouts(n);
    e / (e - 1.0) * config.probe_interval.as_secs_f64() + min.as_secs_f64()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json_out = PathBuf::from(&args.json_out);
    let img_dir = PathBuf::from(&args.img_dir);

    let rows: Vec<Row> = if args.plot_only {
        serde_json::from_str(&fs::read_to_string(&json_out)?)?
    } else {
        let mut config = Config::new_lan();
        if let Some(s) = args.push_pull_s {
            if !(s > 0.0 && s.is_finite()) {
                return Err(format!("--push-pull-s must be a positive number of seconds, got {s}").into());
            }
            config.push_pull_interval = std::time::Duration::from_secs_f64(s);
        }
        if args.no_anti_entropy {
            config.replication.mode = Mode::Rumor;
        }
        let cases = cases(args.quick, &args.only_nodes, &args.only_loss);
        if cases.is_empty() {
            return Err("no configuration left: --nodes takes 100, 1000 or 10000 and --loss 0 or 0.05".into());
        }
        let entries = sweep(&config, &cases, &json_out)?;
        serde_json::from_value(serde_json::to_value(&entries)?)?
    };

    fs::create_dir_all(&img_dir)?;
    let detection = img_dir.join("membership-detection.svg");
    let bandwidth = img_dir.join("membership-bandwidth.svg");
    detection_chart(&rows, &detection)?;
    bandwidth_chart(&rows, &bandwidth)?;
    eprintln!("wrote {}, {}", detection.display(), bandwidth.display());
    if args.markdown {
        eprintln!("{}", markdown(&rows));
    }
    Ok(())
}

/// Runs every case, one after the other (the largest needs several GB of
/// memory), printing a JSON line per case and rewriting `json_out` after
/// each so that an interrupted sweep keeps what it measured.
fn sweep(config: &Config, cases: &[Case], json_out: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for c in cases {
        eprintln!(
            "simulating {} members, {}% loss, {} run{} of {} s…",
            c.nodes,
            c.loss * 100.0,
            c.runs,
            if c.runs == 1 { "" } else { "s" },
            c.duration_s
        );
        let params = MembershipParams {
            nodes: c.nodes,
            loss: c.loss,
            kill: KILL,
            duration_s: c.duration_s,
            seed: SEED,
            runs: c.runs,
            config: config.clone(),
        };
        let started = Instant::now();
        let report = membership::run(&params);
        let wall_s = started.elapsed().as_secs_f64();
        let (min, max) = config.suspicion_timeouts(c.nodes);
        let entry = Entry {
            report,
            expected_first_s: expected_first_s(config, c.nodes),
            suspicion_min_s: min.as_secs_f64(),
            suspicion_max_s: max.as_secs_f64(),
            push_pull_interval_s: config.push_pull_interval_for(c.nodes).as_secs_f64(),
            anti_entropy: config.replication.mode != Mode::Rumor,
            wall_s,
        };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", serde_json::to_string(&entry)?)?;
        stdout.flush()?;
        entries.push(entry);
        if let Some(dir) = json_out.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(json_out, serde_json::to_string_pretty(&entries)? + "\n")?;
    }
    Ok(entries)
}

fn group_label(r: &Row) -> String {
    format!("n={} loss {}%", r.nodes, r.loss * 100.0)
}

const FIRST: RGBColor = RGBColor(31, 119, 180);
const ALL: RGBColor = RGBColor(255, 127, 14);
const THEORY: RGBColor = RGBColor(44, 160, 44);
const NO_LOSS: RGBColor = RGBColor(31, 119, 180);
const LOSS: RGBColor = RGBColor(214, 39, 40);

/// The x axis of both charts: one slot per row.
fn x_axis(rows: &[Row]) -> RangedCoordf64 {
    (-0.5..rows.len() as f64 - 0.5).into()
}

/// Labels every slot "n=… loss …%" under the axis. Drawn by hand: the
/// automatic key points of a continuous axis need not fall on the slots.
fn x_labels<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    chart: &ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    rows: &[Row],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let style = TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, r) in rows.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64, 0.0));
        root.draw(&Text::new(group_label(r), (x, y + 8), style.clone()))?;
    }
    Ok(())
}

/// Bars of the mean first and last detection per configuration, a whisker
/// to the slowest last detection, and the SWIM/Lifeguard expectation of the
/// first detection as a dashed line over the configurations of each size.
fn detection_chart(rows: &[Row], path: &Path) -> Result<()> {
    let y_max = rows
        .iter()
        .flat_map(|r| {
            [
                r.detect_first_s,
                r.detect_all_s,
                r.detect_all_max_s,
                Some(r.expected_first_s),
            ]
        })
        .flatten()
        .fold(1.0f64, f64::max)
        * 1.4;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Failure detection after a crash (simulator, LAN preset, 5 kills per run)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis(rows), 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("members / datagram loss")
        .y_desc("seconds after the kill")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    x_labels(&root, &chart, rows)?;

    let bar = |i: usize, offset: f64, v: f64, color: RGBColor| {
        let x = i as f64 + offset;
        Rectangle::new([(x - 0.17, 0.0), (x + 0.17, v)], color.filled())
    };
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .filter_map(|(i, r)| r.detect_first_s.map(|v| bar(i, -0.18, v, FIRST))),
        )?
        .label("first member declares it failed (mean)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], FIRST.filled()));
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .filter_map(|(i, r)| r.detect_all_s.map(|v| bar(i, 0.18, v, ALL))),
        )?
        .label("every survivor declared it failed (mean)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], ALL.filled()));

    // Whiskers from the mean to the slowest "all" detection.
    let whisker = ShapeStyle::from(&BLACK).stroke_width(2);
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let (mean, max) = (r.detect_all_s?, r.detect_all_max_s?);
            let x = i as f64 + 0.18;
            Some(PathElement::new(vec![(x, mean), (x, max)], whisker))
        }))?
        .label("every survivor declared it failed (slowest)")
        .legend(move |(x, y)| PathElement::new(vec![(x + 7, y - 6), (x + 7, y + 6)], whisker));
    chart.draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
        let max = r.detect_all_max_s?;
        let x = i as f64 + 0.18;
        Some(PathElement::new(vec![(x - 0.07, max), (x + 0.07, max)], whisker))
    }))?;

    // The expectation, one dashed segment per cluster size.
    let theory = ShapeStyle::from(&THEORY).stroke_width(3);
    let mut labelled = false;
    let mut i = 0;
    while i < rows.len() {
        let mut j = i;
        while j + 1 < rows.len() && rows[j + 1].nodes == rows[i].nodes {
            j += 1;
        }
        let y = rows[i].expected_first_s;
        let series = chart.draw_series(DashedLineSeries::new(
            vec![(i as f64 - 0.45, y), (j as f64 + 0.45, y)],
            8,
            5,
            theory,
        ))?;
        if !labelled {
            series
                .label("expected first detection: e/(e-1)·probe + min suspicion")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], theory));
            labelled = true;
        }
        i = j + 1;
    }

    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Bars of the bytes each member sends per second, per configuration.
fn bandwidth_chart(rows: &[Row], path: &Path) -> Result<()> {
    let y_max = rows.iter().map(|r| r.bytes_per_member_per_s).fold(1.0f64, f64::max) * 1.2;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Traffic sent per member (simulator, LAN preset, 36-byte header included)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_axis(rows), 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("members / datagram loss")
        .y_desc("bytes per member per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    x_labels(&root, &chart, rows)?;
    for (loss, color, label) in [(false, NO_LOSS, "no loss"), (true, LOSS, "5% datagram loss")] {
        chart
            .draw_series(
                rows.iter()
                    .enumerate()
                    .filter(|(_, r)| (r.loss > 0.0) == loss)
                    .map(|(i, r)| {
                        let x = i as f64;
                        Rectangle::new([(x - 0.3, 0.0), (x + 0.3, r.bytes_per_member_per_s)], color.filled())
                    }),
            )?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    // The value and the message rate above each bar: one short label each.
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        Text::new(
            format!(
                "{:.0} B/s, {:.1} msg/s",
                r.bytes_per_member_per_s, r.messages_per_member_per_s
            ),
            (i as f64 - 0.38, r.bytes_per_member_per_s + y_max * 0.03),
            ("sans-serif", 13),
        )
    }))?;
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

fn markdown(rows: &[Row]) -> String {
    let s = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let mut out = String::from(
        "| members | loss | runs × simulated s | detect_first_s | expected first | detect_all_s | detect_all_max_s | \
         undetected | false_positives | false_suspicions | converged | messages/member/s | bytes/member/s | wall s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {}% | {} × {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} |\n",
            r.nodes,
            r.loss * 100.0,
            r.runs,
            r.duration_s,
            s(r.detect_first_s),
            r.expected_first_s,
            s(r.detect_all_s),
            s(r.detect_all_max_s),
            r.undetected,
            r.false_positives,
            r.false_suspicions,
            if r.converged { "yes" } else { "no" },
            r.messages_per_member_per_s,
            r.bytes_per_member_per_s,
            r.wall_s,
        );
    }
    out
}

/// The legend box both charts use: upper left, framed, half-transparent.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
