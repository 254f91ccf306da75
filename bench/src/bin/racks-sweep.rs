//! `racks-sweep`: the simulator's racks experiment
//! (`rumormill_sim::racks::run`) over racks ∈ {2, 3, 5, 10} × members per
//! rack ∈ {100, 1,000}, each next to the same members as one flat overlay,
//! written as JSON and drawn as SVG charts: cross-rack bytes against the
//! flat overlay as racks grow, and a timeline of cross-rack bytes around the
//! gateway kill.

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use plotters::prelude::*;
use rumormill_sim::racks::{self, RacksParams, RacksReport};
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Where the results go by default: the workspace's `docs/`.
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");

/// Racks benchmark: what crosses between racks, racked against flat.
#[derive(Debug, Parser)]
#[command(name = "racks-sweep")]
struct Args {
    /// Leave out the racks of 1,000 members.
    #[arg(long)]
    quick: bool,
    /// Only these numbers of racks (repeat the flag for several).
    #[arg(long = "racks", value_name = "R")]
    only_racks: Vec<usize>,
    /// Only these members per rack (repeat the flag for several).
    #[arg(long = "members-per-rack", value_name = "M")]
    only_members: Vec<usize>,
    /// Do not simulate: redraw the charts from the existing JSON file.
    #[arg(long)]
    plot_only: bool,
    /// Print a Markdown table of the results on standard error at the end.
    #[arg(long)]
    markdown: bool,
    /// The JSON file with all reports.
    #[arg(long, default_value_t = format!("{DOCS}/benchmarks-racks.json"))]
    json_out: String,
    /// Directory of the SVG charts.
    #[arg(long, default_value_t = format!("{DOCS}/img"))]
    img_dir: String,
}

/// One configuration of the sweep.
struct Case {
    racks: usize,
    members_per_rack: usize,
    duration_s: f64,
}

/// The grid: every number of racks with 100 members each, 120 simulated
/// seconds; with 1,000 each, 120 s too, except 10 × 1,000 (10,000 members
/// in the flat run): one run of 60 s.
fn cases(quick: bool, only_racks: &[usize], only_members: &[usize]) -> Vec<Case> {
    let mut out = Vec::new();
    for members_per_rack in [100, 1000] {
        if (quick && members_per_rack > 100) || (!only_members.is_empty() && !only_members.contains(&members_per_rack))
        {
            continue;
        }
        for racks in [2, 3, 5, 10] {
            if !only_racks.is_empty() && !only_racks.contains(&racks) {
                continue;
            }
            let duration_s = if racks * members_per_rack >= 10_000 {
                60.0
            } else {
                120.0
            };
            out.push(Case {
                racks,
                members_per_rack,
                duration_s,
            });
        }
    }
    out
}

/// What is written per configuration: the experiment's report and the wall
/// time it took.
#[derive(Serialize)]
struct Entry {
    #[serde(flatten)]
    report: RacksReport,
    /// Wall-clock seconds the configuration took (both runs).
    wall_s: f64,
}

/// The measures of one run the charts and the table need.
#[derive(Debug, Clone, Deserialize)]
struct Measures {
    cross_rack_bytes_per_s: f64,
    #[serde(default)]
    cross_rack_packets_from_non_gateways: Option<u64>,
    #[serde(default)]
    update_all_p50_ms: Option<f64>,
    #[serde(default)]
    update_all_p99_ms: Option<f64>,
    #[serde(default)]
    event_remote_p50_ms: Option<f64>,
    #[serde(default)]
    event_remote_p99_ms: Option<f64>,
    #[serde(default)]
    gateway_failover_s: Option<f64>,
    events_published: usize,
    events_lost: usize,
    payload_bytes_to_racks_without_subscribers: u64,
    false_positives: usize,
    converged: bool,
    cross_rack_timeline: Vec<f64>,
}

/// One configuration read back from the JSON: the racked run's measures at
/// the top level (absent while the core has no racks), the flat run's
/// under `flat`.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    racks: usize,
    members_per_rack: usize,
    duration_s: f64,
    kill_at_s: Option<f64>,
    #[serde(flatten)]
    racked: Option<Measures>,
    flat: Measures,
    wall_s: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json_out = PathBuf::from(&args.json_out);
    let img_dir = PathBuf::from(&args.img_dir);
    let rows: Vec<Row> = if args.plot_only {
        serde_json::from_str(&fs::read_to_string(&json_out)?)?
    } else {
        let cases = cases(args.quick, &args.only_racks, &args.only_members);
        if cases.is_empty() {
            return Err("no configuration left: --racks takes 2, 3, 5 or 10 and --members-per-rack 100 or 1000".into());
        }
        let entries = sweep(&cases, &json_out)?;
        serde_json::from_value(serde_json::to_value(&entries)?)?
    };
    fs::create_dir_all(&img_dir)?;
    let bytes = img_dir.join("racks-cross-bytes.svg");
    let failover = img_dir.join("racks-failover.svg");
    cross_bytes_chart(&rows, &bytes)?;
    failover_chart(&rows, &failover)?;
    eprintln!("wrote {}, {}", bytes.display(), failover.display());
    if args.markdown {
        eprintln!("{}", markdown(&rows));
    }
    Ok(())
}

/// Runs every case, one after the other (the largest needs several GB of
/// memory), printing a JSON line per case and rewriting `json_out` after
/// each so that an interrupted sweep keeps what it measured.
fn sweep(cases: &[Case], json_out: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for c in cases {
        eprintln!(
            "simulating {} racks × {} members for {} s…",
            c.racks, c.members_per_rack, c.duration_s
        );
        let params = RacksParams {
            racks: c.racks,
            members_per_rack: c.members_per_rack,
            duration_s: c.duration_s,
            ..RacksParams::default()
        };
        let started = Instant::now();
        let report = racks::run(&params)?;
        let entry = Entry {
            report,
            wall_s: started.elapsed().as_secs_f64(),
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

const FLAT: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(255, 127, 14)];
const RACKED: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(44, 160, 44)];

/// Cross-rack bytes per second against the number of racks, one line per
/// run kind (racked, flat) and rack size, on a logarithmic axis.
fn cross_bytes_chart(rows: &[Row], path: &Path) -> Result<()> {
    let values = rows
        .iter()
        .flat_map(|r| {
            [
                Some(r.flat.cross_rack_bytes_per_s),
                r.racked.as_ref().map(|m| m.cross_rack_bytes_per_s),
            ]
        })
        .flatten()
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo = if lo == f64::MAX { 1.0 } else { lo / 3.0 };
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Cross-rack traffic: racked overlay against one flat overlay (simulator, LAN preset)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(1.5f64..10.5f64, (lo..hi * 3.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("racks")
        .y_desc("cross-rack bytes per second")
        .x_labels(10)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (k, per) in [100usize, 1000].into_iter().enumerate() {
        let of_size: Vec<&Row> = rows.iter().filter(|r| r.members_per_rack == per).collect();
        if of_size.is_empty() {
            continue;
        }
        let flat: Vec<(f64, f64)> = of_size
            .iter()
            .map(|r| (r.racks as f64, r.flat.cross_rack_bytes_per_s))
            .collect();
        let color = FLAT[k];
        chart
            .draw_series(LineSeries::new(flat.clone(), color.stroke_width(2)))?
            .label(format!("flat overlay, {per} members per rack"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        chart.draw_series(flat.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        let racked: Vec<(f64, f64)> = of_size
            .iter()
            .filter_map(|r| Some((r.racks as f64, r.racked.as_ref()?.cross_rack_bytes_per_s)))
            .collect();
        if !racked.is_empty() {
            let color = RACKED[k];
            chart
                .draw_series(LineSeries::new(racked.clone(), color.stroke_width(2)))?
                .label(format!("racks with gateways, {per} members per rack"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
            chart.draw_series(racked.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Cross-rack bytes per second, second by second, from 10 s before the
/// gateway kill to 20 s after, in the 3 × 100 configuration (or the first
/// one with a kill).
fn failover_chart(rows: &[Row], path: &Path) -> Result<()> {
    let row = rows
        .iter()
        .find(|r| r.racks == 3 && r.members_per_rack == 100 && r.kill_at_s.is_some())
        .or_else(|| rows.iter().find(|r| r.kill_at_s.is_some()));
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let Some(row) = row else {
        root.present()?;
        return Ok(());
    };
    let kill = row.kill_at_s.unwrap_or(0.0);
    let (from, to) = ((kill - 10.0).max(0.0), (kill + 20.0).min(row.duration_s));
    let window = |m: &Measures| -> Vec<(f64, f64)> {
        m.cross_rack_timeline
            .iter()
            .enumerate()
            // Bucket k holds the bytes of second [k, k + 1).
            .map(|(k, &b)| (k as f64 + 0.5, b))
            .filter(|(t, _)| (from..=to).contains(t))
            .collect()
    };
    let flat = window(&row.flat);
    let racked = row.racked.as_ref().map(window);
    let hi = flat
        .iter()
        .chain(racked.iter().flatten())
        .map(|(_, b)| *b)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Cross-rack bytes per second around the kill of rack 1's gateway ({} racks × {} members)",
                row.racks, row.members_per_rack
            ),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(from - kill..to - kill, (1.0..hi * 3.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds after the kill")
        .y_desc("cross-rack bytes in that second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let shift = |v: &[(f64, f64)]| v.iter().map(|&(t, b)| (t - kill, b.max(1.0))).collect::<Vec<_>>();
    chart
        .draw_series(LineSeries::new(shift(&flat), FLAT[0].stroke_width(2)))?
        .label("flat overlay")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], FLAT[0].stroke_width(2)));
    if let Some(racked) = &racked {
        chart
            .draw_series(LineSeries::new(shift(racked), RACKED[0].stroke_width(2)))?
            .label("racks with gateways")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], RACKED[0].stroke_width(2)));
        if let Some(f) = row.racked.as_ref().and_then(|m| m.gateway_failover_s) {
            let style = ShapeStyle::from(&RACKED[1]).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(vec![(f, 1.0), (f, hi * 3.0)], 6, 4, style))?
                .label(format!("successor sends across ({f:.2} s)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], style));
        }
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (0.0, hi * 3.0)],
            BLACK.stroke_width(1),
        ))?
        .label("gateway killed")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK));
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

fn markdown(rows: &[Row]) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
    let mut out = String::from(
        "| racks × members | run | cross-rack B/s | flat ÷ racked | from non-gateways | update_all p50 / p99 ms | \
         event_remote p50 / p99 ms | gateway_failover_s | events published / lost | payload to racks without subscribers | \
         false positives | converged | wall s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|\n",
    );
    for r in rows {
        let runs = [("racked", r.racked.as_ref()), ("flat", Some(&r.flat))];
        for (kind, m) in runs {
            let Some(m) = m else { continue };
            let ratio = (kind == "racked").then(|| r.flat.cross_rack_bytes_per_s / m.cross_rack_bytes_per_s.max(1e-9));
            out += &format!(
                "| {} × {} | {kind} | {:.0} | {} | {} | {} / {} | {} / {} | {} | {} / {} | {} | {} | {} | {:.1} |\n",
                r.racks,
                r.members_per_rack,
                m.cross_rack_bytes_per_s,
                opt(ratio, 1),
                m.cross_rack_packets_from_non_gateways
                    .map_or("n/a".into(), |n| n.to_string()),
                opt(m.update_all_p50_ms, 0),
                opt(m.update_all_p99_ms, 0),
                opt(m.event_remote_p50_ms, 0),
                opt(m.event_remote_p99_ms, 0),
                opt(m.gateway_failover_s, 2),
                m.events_published,
                m.events_lost,
                m.payload_bytes_to_racks_without_subscribers,
                m.false_positives,
                if m.converged { "yes" } else { "no" },
                r.wall_s,
            );
        }
    }
    out
}

/// The legend box: upper left, framed, half-transparent.
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
