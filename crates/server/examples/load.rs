//! The load test of `visenc serve` (loopback only, bounded in time):
//!
//! ```sh
//! cargo run --release -p visenc-server --example load -- \
//!     --model fixtures/models/clip_hf_gelu --image assets/photos/chelsea.png --clients 512 --seconds 20 \
//!     [--addr 127.0.0.1:8080] [--max-batch 32] [--max-wait-ms 5] [--out bench/load-results.txt]
//! ```
//!
//! Without `--addr` it starts the service in this process on a free loopback port. It prints the
//! report (throughput, p50/p99 latency, statuses, /health, batched == single) and exits 1 if the
//! run failed (any 5xx, transport error, /health failure or batched answer that differs).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use visenc_server::load::{self, LoadConfig};
use visenc_server::{AppState, Config};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let num = |name: &str, default: u64| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(arg(&args, name)
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let image_path = arg(&args, "--image").unwrap_or("assets/photos/chelsea.png".into());
    let image = std::fs::read(&image_path).map_err(|e| format!("{image_path}: {e}"))?;
    let clients = num("--clients", 512)? as usize;
    let seconds = num("--seconds", 20)?;
    let server = match arg(&args, "--addr") {
        Some(a) => Err(a.parse::<SocketAddr>()?),
        None => {
            let model = arg(&args, "--model").ok_or("give --model DIR or --addr HOST:PORT")?;
            let enc = visenc::Encoder::load(&model, &visenc::LoadOptions::default())?;
            let mut config = Config::new(model);
            config.max_batch = num("--max-batch", 32)? as usize;
            config.max_wait = Duration::from_millis(num("--max-wait-ms", 5)?);
            config.max_concurrent = clients.max(1);
            let state = AppState::new(config, enc, None)?;
            Ok(visenc_server::spawn("127.0.0.1:0".parse()?, state)?)
        }
    };
    let addr = match &server {
        Ok(running) => running.addr,
        Err(addr) => *addr,
    };
    let report = load::run(&LoadConfig {
        addr,
        clients,
        duration: Duration::from_secs(seconds),
        image,
        tolerance: 1e-5,
    })?;
    let text = format!(
        "visenc load test: {clients} clients for {seconds} s against http://{addr}\n{report}"
    );
    print!("{text}");
    if let Some(out) = arg(&args, "--out") {
        std::fs::write(&out, &text)?;
    }
    if let Ok(running) = server {
        running.stop()?;
    }
    Ok(report.passed())
}
