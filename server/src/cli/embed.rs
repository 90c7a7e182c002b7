//! `surf embed`: texts in, JSON Lines of embeddings out.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use surf_engine::{Error as EngineError, Prompt};

use super::engine_args::{EngineArgs, OpenedEngine};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print inference and cache statistics as one JSON object on stderr.
    #[arg(long)]
    pub stats: bool,
    /// File with one text per line; an empty line is an empty text.
    #[arg(long, value_name = "FILE", conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// Put the model's prompt NAME (from its config_sentence_transformers.json)
    /// before each text, as sentence-transformers' `prompt_name` does.
    #[arg(long, value_name = "NAME", conflicts_with = "prompt")]
    pub prompt_name: Option<String>,
    /// Put TEXT before each text. Without this or --prompt-name, the model's
    /// default prompt, if it names one.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Texts to embed, when --input is not given.
    pub texts: Vec<String>,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    index: usize,
    tokens: usize,
    embedding: &'a [f32],
}

/// Splits a text file into lines, keeping empty lines as empty texts. Invalid
/// UTF-8 is an error that names the line.
pub fn read_lines(path: &std::path::Path) -> Result<Vec<String>, EngineError> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.into(),
        source,
    })?;
    let mut body: &[u8] = &bytes;
    if body.last() == Some(&b'\n') {
        body = &body[..body.len() - 1];
    }
    if body.is_empty() && bytes.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            String::from_utf8(line.to_vec()).map_err(|e| EngineError::InputFile {
                path: path.into(),
                problem: format!("line {} is not valid UTF-8 ({e})", i + 1),
            })
        })
        .collect()
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let texts = match &args.input {
        Some(path) => read_lines(path)?,
        None => args.texts.clone(),
    };
    // Held until the end: dropping it shuts an in-process server down.
    let (
        OpenedEngine {
            engine,
            embedded_server: _embedded,
        },
        progress,
    ) = args.engine.open_with_progress()?;

    let prompt = match (&args.prompt_name, &args.prompt) {
        (Some(name), _) => Prompt::Named(name),
        (None, Some(text)) => Prompt::Text(text),
        (None, None) => Prompt::Default,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = engine.embed_with_prompt(&refs, prompt);
    progress.finish_and_clear();
    let embeddings = embeddings?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (index, e) in embeddings.iter().enumerate() {
        serde_json::to_writer(
            &mut out,
            &OutputLine {
                index,
                tokens: e.token_ids.len(),
                embedding: &e.vector,
            },
        )?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if args.stats {
        let report = serde_json::json!({
            "stats": engine.inference_stats()?,
            "cache": engine.cache_info()?,
            "memory": {
                "peak_rss_bytes": surf_engine::process_memory::peak_rss_bytes(),
            },
        });
        eprintln!("{report}");
    }
    Ok(())
}
