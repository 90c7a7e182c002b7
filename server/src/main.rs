use std::io::IsTerminal as _;

use clap::{Parser, Subcommand};
use surf_server::cli;

/// Surfing Weights: BERT-family sentence embeddings on any GPU, with weights
/// streamed from a weight server.
#[derive(Debug, Parser)]
#[command(name = "surf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embed texts and print one JSON object per input on stdout.
    Embed(cli::embed::EmbedArgs),
    /// Serve embeddings over HTTP (TEI- and OpenAI-compatible routes).
    Http(cli::http::HttpArgs),
    /// Show the GPU adapter, the kernel families it runs, and the kernel
    /// measured fastest for each of the model's shapes.
    Info(cli::info::InfoArgs),
    /// Score passages against a query with a cross-encoder and print them
    /// as JSON Lines, highest score first.
    Rerank(cli::rerank::RerankArgs),
    /// Score texts or pairs with a sequence classifier and print each
    /// input's labels as JSON Lines.
    Predict(cli::predict::PredictArgs),
    /// Serve a model's weights over QUIC.
    Serve(cli::serve::ServeArgs),
    /// Write a BERT model folder with random weights, for benchmarks at scale.
    Synth(cli::synth::SynthArgs),
}

fn main() {
    quiet_window_system_probe();
    surf_engine::process_memory::return_large_frees_to_the_system();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SURF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes are for people at a terminal; in a log file or a
        // pipe they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => cli::embed::run(args),
        Command::Http(args) => cli::http::run(args),
        Command::Info(args) => cli::info::run(args),
        Command::Rerank(args) => cli::rerank::run(args),
        Command::Predict(args) => cli::predict::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Synth(args) => cli::synth::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(cli::exit_code(&error));
    }
}

/// The Vulkan loader probes the Wayland window system even for compute, and
/// its client library prints "error: XDG_RUNTIME_DIR is invalid or not set"
/// when that variable is missing, as on servers and in containers. The line
/// looks like a failure of ours and is none, so when the variable is missing
/// or names no directory, point it at a private directory of our own.
#[cfg(unix)]
fn quiet_window_system_probe() {
    let usable =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|dir| std::path::Path::new(&dir).is_dir());
    if usable {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".to_owned());
    let dir = std::env::temp_dir().join(format!("surf-runtime-{user}"));
    let made = {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)
    };
    if made.is_err() && !dir.is_dir() {
        return;
    }
    // SAFETY: this runs first in `main`, before any other thread exists
    // (no runtime, no GPU instance, no logger yet), so no one reads the
    // environment while it changes.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(not(unix))]
fn quiet_window_system_probe() {}
