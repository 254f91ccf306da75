//! `serf-compare`: HashiCorp Serf and Rumormill side by side on one machine,
//! in one run — join convergence, event dissemination, failure detection,
//! false failures under loss, bandwidth and memory, for 16, 32 and 64
//! agents of each as separate processes on loopback.
//!
//! The run happens in a network namespace of its own (root needed): the
//! outer process creates it, starts itself inside it, and afterwards kills
//! whatever is left in it and deletes it, whatever happened inside.
//! Results: a JSON file, Markdown tables and SVG charts (see the README).

mod cluster;
mod http;
mod measure;
mod netns;
mod report;
mod serf_rpc;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use cluster::Flavor;
use measure::Plan;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Serf and Rumormill side by side: dissemination, failure detection,
/// bandwidth, memory and join convergence, reported as ratios.
#[derive(Debug, Clone, Parser)]
#[command(name = "serf-compare")]
struct Args {
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    sizes: Vec<usize>,
    /// Events per dissemination phase.
    #[arg(long, default_value_t = 200)]
    events: u32,
    /// Events published per second (15: what Serf's gossip carries at its
    /// defaults is about 18 per member, 8 transmissions each).
    #[arg(long, default_value_t = 15.0)]
    rate: f64,
    /// Agents SIGKILLed per run.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Milliseconds between two kills.
    #[arg(long, default_value_t = 600)]
    kill_spacing_ms: u64,
    /// Seconds of idle traffic counted per run.
    #[arg(long, default_value_t = 4.0)]
    idle_s: f64,
    /// Gossip packets dropped in the loss phase, percent.
    #[arg(long, default_value_t = 10.0)]
    loss_percent: f64,
    /// Length of the loss phase, seconds (0 skips it).
    #[arg(long, default_value_t = 300.0)]
    loss_s: f64,
    /// Systems to run: serf, rumormill, rumormill-tuned.
    #[arg(long, value_delimiter = ',', default_value = "serf,rumormill,rumormill-tuned")]
    systems: Vec<String>,
    /// The whole run is stopped after this many minutes.
    #[arg(long, default_value_t = 15.0)]
    time_limit_min: f64,
    /// The `rumormill` binary [default: next to this one].
    #[arg(long)]
    rumormill: Option<PathBuf>,
    /// The `serf` binary (installed with apt-get when missing).
    #[arg(long, default_value = "serf")]
    serf: PathBuf,
    /// Results file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/benchmarks-serf.json"))]
    json_out: PathBuf,
    /// Directory of the charts.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/img"))]
    img_dir: PathBuf,
    /// Redraw the charts and print the tables from the results file
    /// without running anything.
    #[arg(long)]
    report_only: bool,
    /// Keep the agents' logs and data directories (their path is printed).
    #[arg(long)]
    keep: bool,
    /// Internal: run the measurements (inside the namespace).
    #[arg(long, hide = true)]
    inside: Option<PathBuf>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    let args = Args::parse();
    let result = if args.report_only {
        report::load(&args.json_out).and_then(|r| report::write(&r, &args.img_dir))
    } else if let Some(work) = args.inside.clone() {
        inside(&args, &work)
    } else {
        outside(&args)
    };
    if let Err(e) = result {
        eprintln!("serf-compare: {e}");
        std::process::exit(1);
    }
}

/// Prepares the machine, runs the measurements in a new network namespace,
/// and removes every trace of it afterwards.
fn outside(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (it creates a network namespace and nftables rules)".into());
    }
    flavors(args)?;
    let rumormill = rumormill_bin(args)?;
    install_missing(&args.serf)?;
    let name = format!("rmbench-{}", std::process::id());
    let work = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&work)?;
    netns::create(&name)?;
    // SAFETY: the handler only stores to an atomic. Handlers are reset by
    // exec, so the child keeps the default reaction to Ctrl-C.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = (|| -> Result<()> {
        let me = std::env::current_exe()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(me)
            .args(std::env::args_os().skip(1))
            .arg("--rumormill")
            .arg(&rumormill)
            .arg("--inside")
            .arg(&work)
            .spawn()?;
        let limit = Duration::from_secs_f64(args.time_limit_min * 60.0);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("the run failed ({status})").into())
                };
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("interrupted".into());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("stopped after the time limit ({} min)", args.time_limit_min).into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    netns::destroy(&name);
    let _ = std::fs::remove_dir_all(cluster::memory_dir(&work));
    if args.keep {
        eprintln!("serf-compare: logs and data kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

/// The systems `--systems` names, in the order they run.
fn flavors(args: &Args) -> Result<Vec<Flavor>> {
    let all = [Flavor::Serf, Flavor::RumormillLan, Flavor::RumormillTuned];
    if let Some(bad) = args
        .systems
        .iter()
        .find(|s| !all.iter().any(|f| f.label() == s.as_str()))
    {
        return Err(format!("--systems: unknown system {bad:?} (serf, rumormill, rumormill-tuned)").into());
    }
    Ok(all
        .into_iter()
        .filter(|f| args.systems.iter().any(|s| s == f.label()))
        .collect())
}

fn rumormill_bin(args: &Args) -> Result<PathBuf> {
    let path = match &args.rumormill {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("rumormill"),
    };
    if !path.exists() {
        return Err(format!(
            "no rumormill binary at {} (build it first: cargo build --release -p rumormill)",
            path.display()
        )
        .into());
    }
    Ok(path.canonicalize()?)
}

/// Installs Serf and nftables from the distribution when missing.
fn install_missing(serf: &Path) -> Result<()> {
    let have = |p: &Path| {
        Command::new(p)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing = Vec::new();
    if !have(serf) {
        missing.push("serf");
    }
    if Command::new("nft").arg("--version").output().is_err() {
        missing.push("nftables");
    }
    if !missing.is_empty() {
        eprintln!("serf-compare: installing {}", missing.join(", "));
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            netns::run("apt-get", &[&["install", "-y", "-q"][..], &missing].concat())?;
        }
    }
    Ok(())
}

/// The measurements, inside the namespace.
fn inside(args: &Args, work: &Path) -> Result<()> {
    let started = Instant::now();
    let rumormill = args
        .rumormill
        .clone()
        .ok_or("--rumormill is set by the outer process")?;
    let serf_key = netns::run(&args.serf.to_string_lossy(), &["keygen"])?
        .trim()
        .to_string();
    let our_key = netns::run(&rumormill.to_string_lossy(), &["keygen"])?
        .trim()
        .to_string();
    let plan = Plan {
        events: args.events,
        interval: Duration::from_secs_f64(1.0 / args.rate),
        kills: args.kills,
        kill_spacing: Duration::from_millis(args.kill_spacing_ms),
        settle: Duration::from_secs(1),
        idle: Duration::from_secs_f64(args.idle_s),
        tail: Duration::from_millis(1500),
        drain: Duration::from_secs(10),
        join_limit: Duration::from_secs(10),
    };
    let flavors = flavors(args)?;
    let bin = |f: Flavor| {
        if f.is_rumormill() {
            rumormill.clone()
        } else {
            args.serf.clone()
        }
    };
    let key = |f: Flavor| {
        if f.is_rumormill() {
            our_key.clone()
        } else {
            serf_key.clone()
        }
    };

    let mut results = report::Results {
        machine: report::Machine::read(&args.serf, &rumormill),
        command: "sudo cargo run --release -p rumormill-bench --bin serf-compare".into(),
        plan: report::PlanInfo::from_plan(&plan, args),
        runs: Vec::new(),
        loss: Vec::new(),
        seconds: 0.0,
    };
    // Each system alone on the machine, one after the other (A B A B…).
    for &n in &args.sizes {
        for &flavor in &flavors {
            eprintln!(
                "serf-compare: {} × {n} ({:.0} s in)",
                flavor.label(),
                started.elapsed().as_secs_f64()
            );
            let run = measure::run(flavor, n, &plan, work, &bin(flavor), &key(flavor))?;
            results.runs.push(run);
        }
    }
    if args.loss_s > 0.0 {
        eprintln!(
            "serf-compare: loss phase, {}% for {:.0} s ({:.0} s in)",
            args.loss_percent,
            args.loss_s,
            started.elapsed().as_secs_f64()
        );
        let bins: Vec<(Flavor, PathBuf, String)> = flavors.iter().map(|&f| (f, bin(f), key(f))).collect();
        let specs: Vec<(Flavor, usize, &Path, &str)> = bins
            .iter()
            .flat_map(|(f, b, k)| args.sizes.iter().map(move |&n| (*f, n, b.as_path(), k.as_str())))
            .collect();
        results.loss = measure::loss_phase(
            &specs,
            args.loss_percent,
            Duration::from_secs_f64(args.loss_s),
            &plan,
            work,
        )?;
    }
    results.seconds = started.elapsed().as_secs_f64();
    std::fs::write(&args.json_out, serde_json::to_string_pretty(&results)?)?;
    report::write(&results, &args.img_dir)?;
    eprintln!(
        "serf-compare: done in {:.0} s; results in {}",
        results.seconds,
        args.json_out.display()
    );
    Ok(())
}
