//! `surf rerank`: a query and passages in, JSON Lines of (index, score) out,
//! highest score first.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

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
    ) = args.engine.open_with_progress()?;
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
