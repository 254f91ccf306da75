//! `dissemination-sweep`: the dissemination experiments behind
//! docs/benchmarks.md — Demers et al.'s synchronous model (rumor mongering
//! for every variant and k = 1..5; anti-entropy rounds against theory) and
//! the real protocols over the simulated network at 1,000, 10,000 and
//! 100,000 members — written as JSON and an SVG chart, with the Markdown
//! tables of docs/benchmarks.md on standard output.

use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use clap::Parser;
use plotters::prelude::*;
use rumormill_core::replication::{Mode, ReplicationConfig};
use rumormill_sim::epidemic::{self, AntiEntropyParams, DemersParams, Direction, Loss, Removal};
use rumormill_sim::replication::{self, ReplicationParams, ReplicationReport};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");

/// Replication benchmarks: synchronous models and the real protocols.
#[derive(Debug, Parser)]
#[command(name = "dissemination-sweep")]
struct Args {
    /// Leave out the 100,000-member broadcast runs.
    #[arg(long)]
    quick: bool,
    /// Runs per configuration of the synchronous models.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Where the JSON and the chart go (the Markdown tables go to standard
    /// output).
    #[arg(long, default_value_t = DOCS.to_string())]
    out: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let out = Path::new(&args.out);
    fs::create_dir_all(out.join("img"))?;
    let mut md = String::new();

    // 1. Rumor mongering in the synchronous model, n = 1,000.
    writeln!(
        md,
        "| direction | removal | loss | k | residue | traffic | t_ave | t_last |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let mut demers = Vec::new();
    for &direction in Direction::ALL {
        for &removal in Removal::ALL {
            for &loss in Loss::ALL {
                for k in 1..=5 {
                    let p = DemersParams {
                        nodes: 1000,
                        runs: args.runs,
                        seed: 1,
                        direction,
                        removal,
                        loss,
                        k,
                    };
                    let r = epidemic::demers::run(&p)?;
                    writeln!(
                        md,
                        "| {direction} | {removal} | {loss} | {k} | {:.2e} | {:.2} | {:.2} | {:.2} |",
                        r.residue, r.traffic, r.t_ave, r.t_last
                    )?;
                    demers.push(r);
                }
            }
        }
    }
    eprintln!("rumor mongering (synchronous): {} configurations", demers.len());

    // 2. Anti-entropy rounds against theory.
    writeln!(md, "\n| n | direction | rounds mean | p99 | max | theory |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut anti_entropy = Vec::new();
    for nodes in [1000, 10_000] {
        for &direction in Direction::ALL {
            let r = epidemic::anti_entropy::run(&AntiEntropyParams {
                nodes,
                runs: args.runs,
                seed: 1,
                direction,
            })?;
            let theory = epidemic::theory_rounds(direction, nodes);
            writeln!(
                md,
                "| {nodes} | {direction} | {:.2} | {} | {} | {theory:.2} |",
                r.rounds_mean, r.rounds_p99, r.rounds_max
            )?;
            anti_entropy.push(json!({ "report": r, "direction": direction.as_str(), "theory": theory }));
        }
    }
    eprintln!("anti-entropy (synchronous): done");

    // 3. The real protocols over the simulated network.
    writeln!(
        md,
        "\n| n | loss | mode | delivery | p50 | p99 | max | messages/member | bytes/member | copies/member |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    let mut broadcasts: Vec<ReplicationReport> = Vec::new();
    let sizes: &[usize] = if args.quick {
        &[1000, 10_000]
    } else {
        &[1000, 10_000, 100_000]
    };
    for &nodes in sizes {
        for loss in [0.0, 0.05] {
            for &mode in Mode::ALL {
                let config = ReplicationConfig {
                    mode,
                    ..ReplicationConfig::default()
                };
                // Anti-entropy alone needs about log3(n) exchanges of 10 s.
                let duration_s = if mode == Mode::AntiEntropy { 240.0 } else { 60.0 };
                let p = ReplicationParams {
                    nodes,
                    loss,
                    config,
                    duration_s,
                    seed: 1,
                    runs: 1,
                };
                let r = replication::run(&p);
                let ms = |v: Option<f64>| {
                    v.map_or("–".into(), |s| {
                        if s < 1.0 {
                            format!("{:.1} ms", s * 1e3)
                        } else {
                            format!("{s:.1} s")
                        }
                    })
                };
                writeln!(
                    md,
                    "| {nodes} | {:.0}% | {mode} | {:.4} | {} | {} | {} | {:.1} | {:.0} | {:.2} |",
                    loss * 100.0,
                    r.delivery,
                    ms(r.latency_p50_s),
                    ms(r.latency_p99_s),
                    ms(r.latency_max_s),
                    r.messages_per_member,
                    r.bytes_per_member,
                    r.copies_per_member
                )?;
                eprintln!("broadcast n={nodes} loss={loss} {mode}: delivery {:.4}", r.delivery);
                broadcasts.push(r);
            }
        }
    }

    fs::write(
        out.join("benchmarks-replication.json"),
        serde_json::to_string_pretty(&json!({
            "demers": demers,
            "anti_entropy": anti_entropy,
            "broadcast": broadcasts,
        }))?,
    )?;
    chart(&broadcasts, &out.join("img/dissemination-informed.svg"))?;
    print!("{md}");
    Ok(())
}

/// Fraction of members informed against time (log scale), one line per mode,
/// for the largest loss-free run of each mode.
fn chart(reports: &[ReplicationReport], path: &Path) -> Result<()> {
    let largest = reports
        .iter()
        .filter(|r| r.loss == 0.0)
        .map(|r| r.nodes)
        .max()
        .unwrap_or(0);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Fraction of {largest} members informed after a write (simulated LAN)"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((0.000_1f64..300f64).log_scale(), 0f64..1.02f64)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the write (log scale)")
        .y_desc("fraction informed")
        .x_labels(8)
        .draw()?;
    let colors = [RED, BLUE, BLACK];
    for (i, &mode) in Mode::ALL.iter().enumerate() {
        let Some(r) = reports
            .iter()
            .find(|r| r.nodes == largest && r.loss == 0.0 && r.mode == mode.as_str())
        else {
            continue;
        };
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = r.curve.iter().map(|&(t, f)| (t.max(0.000_1), f)).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(mode.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
