//! `surf predict`: texts (or tab-separated pairs) in, each input's labels
//! with their scores out, as JSON Lines in input order.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use surf_engine::{ClassifierInput, ScoreOptions};

use super::engine_args::{EngineArgs, OpenedEngine};
use super::rerank::read_inputs;

#[derive(Debug, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// File with one input per line; an empty line is an empty text.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Each line is a pair, its two texts separated by the first tab.
    #[arg(long)]
    pub pairs: bool,
    /// Print the model's logits instead of their softmax (sigmoid for one label).
    #[arg(long)]
    pub raw_scores: bool,
}

#[derive(Serialize)]
struct LabelLine<'a> {
    label: &'a str,
    score: f32,
}

#[derive(Serialize)]
struct PredictionLine<'a> {
    index: usize,
    predictions: Vec<LabelLine<'a>>,
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let lines = read_inputs(&args.input)?;
    let inputs: Vec<ClassifierInput<'_>> = lines
        .iter()
        .map(|line| match line.split_once('\t') {
            Some((first, second)) if args.pairs => ClassifierInput::Pair(first, second),
            _ if args.pairs => ClassifierInput::Pair(line, ""),
            _ => ClassifierInput::Text(line),
        })
        .collect();
    // Held until the end: dropping it shuts an in-process server down.
    let (
        OpenedEngine {
            engine,
            embedded_server: _embedded,
        },
        progress,
    ) = args.engine.open_with_progress()?;
    let options = ScoreOptions {
        raw_scores: args.raw_scores,
        ..ScoreOptions::default()
    };
    let predictions = engine.predict(&inputs, options);
    progress.finish_and_clear();
    let predictions = predictions?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (index, labels) in predictions.iter().enumerate() {
        let line = PredictionLine {
            index,
            predictions: labels
                .iter()
                .map(|p| LabelLine {
                    label: &p.label,
                    score: p.score,
                })
                .collect(),
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
