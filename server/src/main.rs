//! `rl4pix-server`: serves the editing model over HTTP until SIGTERM / Ctrl-C.

use std::io::Write;

use clap::Parser;
use rl4pix_server::Args;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = Args::parse().with_shipped_adapters();
    if args.print_openapi {
        print!("{}", rl4pix_server::openapi::json());
        return;
    }
    if let Err(message) = args.validate() {
        eprintln!("rl4pix-server: {message}");
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rl4pix-server: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(args)) {
        eprintln!("rl4pix-server: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let server = rl4pix_server::start(&args).await?;
    // Tests and scripts read the bound address (useful with --port 0) from this line.
    println!("rl4pix-server listening on {}", server.url());
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    if args.shutdown_drain_s > 0.0 {
        server.service.begin_drain();
        tracing::info!(
            seconds = args.shutdown_drain_s,
            "draining: /ready answers 503, requests still admitted"
        );
        tokio::time::sleep(std::time::Duration::from_secs_f64(args.shutdown_drain_s)).await;
    }
    tracing::info!("shutting down: finishing admitted requests");
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
