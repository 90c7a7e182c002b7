//! `surf rerank`: a query and passages in, JSON Lines of (index, score) out,
//! highest score first.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde::Serialize;
use surf_engine::{Error as EngineError, ScoreOptions};

use super::embed::read_lines;
use super::engine_args::{EngineArgs, OpenedEngine};

#[derive(Debug, Args)]
pub struct RerankArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The query every passage is scored against.
    #[arg(long, value_name = "TEXT")]
    pub query: String,
    /// File with one passage per line; an empty line is an empty passage.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Print the model's logits instead of their sigmoid.
    #[arg(long)]
    pub raw_scores: bool,
    /// Print only the N best passages.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub top_n: Option<u64>,
}

#[derive(Serialize)]
struct RankLine {
    index: usize,
    score: f32,
}

/// Opens the engine the flags name, with a progress bar over the layers
/// while they stream in on a cold start (hidden when stderr is not a
/// terminal). The bar is for the caller to clear.
pub fn open_with_progress(
    args: &EngineArgs,
) -> anyhow::Result<(OpenedEngine, indicatif::ProgressBar)> {
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message("streaming weights");
    let bar = progress.clone();
    let builder = args
        .builder()
        .on_layer_fetched(Arc::new(move |_layer, _bytes| bar.inc(1)));
    let opened = args.open(builder)?;
    Ok((opened, progress))
}

/// Reads a file of inputs, refusing one with none.
pub fn read_inputs(path: &std::path::Path) -> Result<Vec<String>, EngineError> {
    let lines = read_lines(path)?;
    if lines.is_empty() {
        return Err(EngineError::InputFile {
            path: path.into(),
            problem: "the file is empty: give one input per line".into(),
        });
    }
    Ok(lines)
}

pub fn run(args: RerankArgs) -> anyhow::Result<()> {
    let passages = read_inputs(&args.input)?;
    // Held until the end: dropping it shuts an in-process server down.
    let (
        OpenedEngine {
            engine,
            embedded_server: _embedded,
        },
        progress,
    ) = open_with_progress(&args.engine)?;
    let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
    let options = ScoreOptions {
        raw_scores: args.raw_scores,
        ..ScoreOptions::default()
    };
    let ranked = engine.rerank_with(&args.query, &refs, options);
    progress.finish_and_clear();
    let ranked = ranked?;
    let shown = args
        .top_n
        .map_or(ranked.len(), |n| usize::try_from(n).unwrap_or(usize::MAX));
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for &(index, score) in ranked.iter().take(shown) {
        serde_json::to_writer(&mut out, &RankLine { index, score })?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
