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
    /// Serve a model's weights over QUIC.
    Serve(cli::serve::ServeArgs),
    /// Write a BERT model folder with random weights, for benchmarks at scale.
    Synth(cli::synth::SynthArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SURF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => cli::embed::run(args),
        Command::Http(args) => cli::http::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Synth(args) => cli::synth::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(cli::exit_code(&error));
    }
}
