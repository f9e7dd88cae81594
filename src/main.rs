//! The `tollgate` binary: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use tollgate::cli::{Cli, Command};
use tollgate::config::Config;
use tollgate::server::{self, Gateway};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tollgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            println!(
                "{}: ok ({} models, {} upstreams)",
                config.display(),
                loaded.models.len(),
                loaded.upstreams.len()
            );
            Ok(())
        }
        Command::Serve { config, listen } => {
            let mut loaded = Config::load(&config)?;
            if let Some(listen) = listen {
                loaded.server.listen = listen;
            }
            init_logging(loaded.server.log_json);
            runtime()?.block_on(serve(loaded))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let gateway = Gateway::start(config)?;
    let listener = server::bind(listen).await?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    println!("tollgate listening on http://{addr}");
    tracing::info!(%addr, "listening");
    gateway.serve(listener, server::termination()).await?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
