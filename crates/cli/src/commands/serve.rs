//! `visenc serve`: the HTTP service (visenc-server) for one model.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::{batch, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model name clients send as "model" (default: the --model value).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most items in one forward pass.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// How long the first item of a batch waits for more, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Requests answered at once; more get 429.
    #[arg(long, default_value_t = 512)]
    max_concurrent: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Most inputs in one request.
    #[arg(long, default_value_t = 2048)]
    max_inputs: usize,
}

pub fn run(a: ServeArgs) -> Result<usize> {
    let enc = batch::load_encoder(&a.model)?;
    let mut config =
        visenc_server::Config::new(a.served_model_name.unwrap_or(a.model.model.clone()));
    config.max_batch = a.max_batch.max(1);
    config.max_wait = Duration::from_millis(a.max_wait_ms);
    config.max_concurrent = a.max_concurrent.max(1);
    config.max_body_bytes = a.max_body_bytes;
    config.max_inputs = a.max_inputs.max(1);
    let state =
        visenc_server::AppState::new(config, enc, None).context("starting the model thread")?;
    let addr = SocketAddr::new(a.host, a.port);
    visenc_server::run(addr, state, |bound| {
        println!("listening on http://{bound}");
        eprintln!(
            "visenc: serving {} on http://{bound} (Ctrl-C to stop)",
            a.model.model
        );
    })
    .with_context(|| format!("serving on {addr}"))?;
    eprintln!("visenc: stopped after finishing the requests in flight");
    Ok(0)
}
