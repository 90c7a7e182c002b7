//! `surf synth`: writes a model folder of any supported family with random
//! weights, so that paging and throughput can be measured on models larger
//! than any budget.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use surf_engine::Error as EngineError;
use surf_engine::kernels::attention::MAX_HEAD_DIM;
use surf_engine::synth::{SynthFamily, SynthPreset, SynthSpec, write_model};

/// The MiniLM tokenizer, relative to the working directory: its vocabulary
/// fits the 30522 rows of the generated embedding table.
pub const DEFAULT_TOKENIZER: &str = "assets/models/all-MiniLM-L6-v2/tokenizer.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// 12 layers, hidden 768, 12 heads, intermediate 3072.
    Base,
    /// 24 layers, hidden 1024, 16 heads, intermediate 4096.
    Large,
    /// TinyLlama-1.1B's shape (a LLaMA decoder, about 4.4 GB in f32).
    #[value(name = "tinyllama")]
    TinyLlama,
    /// Qwen3-Embedding-0.6B's shape (about 2.4 GB in f32).
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6B,
    /// Qwen3-Embedding-4B's shape (about 8 GB in f16).
    #[value(name = "qwen3-4b")]
    Qwen3_4B,
    /// Qwen3-Embedding-8B's shape (about 15 GB in f16).
    #[value(name = "qwen3-8b")]
    Qwen3_8B,
}

impl Preset {
    /// The real model whose shape the preset is, if it is one.
    fn real_model(self) -> Option<SynthPreset> {
        match self {
            Preset::Base | Preset::Large => None,
            Preset::TinyLlama => Some(SynthPreset::TinyLlama),
            Preset::Qwen3_0_6B => Some(SynthPreset::Qwen3_0_6B),
            Preset::Qwen3_4B => Some(SynthPreset::Qwen3_4B),
            Preset::Qwen3_8B => Some(SynthPreset::Qwen3_8B),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Family {
    Bert,
    XlmRoberta,
    Mpnet,
    T5,
    Llama,
    Qwen3,
}

impl Family {
    fn synth(self) -> SynthFamily {
        match self {
            Family::Bert => SynthFamily::Bert,
            Family::XlmRoberta => SynthFamily::XlmRoberta,
            Family::Mpnet => SynthFamily::MPNet,
            Family::T5 => SynthFamily::T5,
            Family::Llama => SynthFamily::Llama,
            Family::Qwen3 => SynthFamily::Qwen3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageDtype {
    F32,
    F16,
    Bf16,
}

impl StorageDtype {
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            StorageDtype::F32 => safetensors::Dtype::F32,
            StorageDtype::F16 => safetensors::Dtype::F16,
            StorageDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }

    fn bytes(self) -> u64 {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::Bf16 => 2,
        }
    }
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to write (config.json, model.safetensors, tokenizer.json and the
    /// sentence-transformers files for mean pooling).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The model family: BERT, XLM-RoBERTa (positions past the padding id,
    /// one token type), MPNet (relative position bias) or a T5 encoder
    /// (RMS norms, gated feed-forward, relative position bias), or a LLaMA
    /// or Qwen3 decoder (rotary positions, grouped-query attention, SwiGLU,
    /// last-token pooling). The presets of real models set their own.
    #[arg(long, value_enum, default_value_t = Family::Bert)]
    pub family: Family,
    /// A sequence classifier (a cross-encoder) with N labels instead of an
    /// embedder: BERT's pooler and classifier, or RoBERTa's classification head.
    #[arg(long, value_name = "N")]
    pub labels: Option<usize>,
    /// Rows of the word embedding table [default: 30522, the default
    /// tokenizer's]; 250002 is XLM-R's.
    #[arg(long, value_name = "V")]
    pub vocab: Option<usize>,
    /// A standard BERT shape, or a real model's (TinyLlama-1.1B,
    /// Qwen3-Embedding 0.6B, 4B or 8B), instead of --layers and --hidden.
    #[arg(long, value_enum, conflicts_with_all = ["layers", "hidden", "heads", "intermediate"])]
    pub preset: Option<Preset>,
    /// Encoder layers.
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "preset",
        requires = "hidden"
    )]
    pub layers: Option<usize>,
    /// Hidden size.
    #[arg(
        long,
        value_name = "H",
        required_unless_present = "preset",
        requires = "layers"
    )]
    pub hidden: Option<usize>,
    /// Attention heads [default: hidden / 64, at least 1].
    #[arg(long, value_name = "A")]
    pub heads: Option<usize>,
    /// Feed-forward size [default: 4 * hidden].
    #[arg(long, value_name = "I")]
    pub intermediate: Option<usize>,
    /// Storage type of the weights.
    #[arg(long, value_enum, default_value_t = StorageDtype::F32)]
    pub dtype: StorageDtype,
    /// Seed of the random weights: the same seed and shape give the same bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// tokenizer.json to copy into the folder.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_TOKENIZER)]
    pub tokenizer: PathBuf,
    /// Write into a folder that already holds files, replacing those of a model folder.
    #[arg(long)]
    pub force: bool,
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidInput(message)
}

/// The shape the flags ask for, refused when the engine could not run it.
pub fn spec_from_args(args: &SynthArgs) -> Result<SynthSpec, EngineError> {
    if let Some(real) = args.preset.and_then(Preset::real_model) {
        if args.family != Family::Bert {
            return Err(invalid(
                "--preset of a real model sets its own family; drop --family".into(),
            ));
        }
        let mut spec = SynthSpec::preset(real);
        return finish_spec(args, &mut spec).map(|()| spec);
    }
    let mut spec = match (args.preset, args.layers, args.hidden) {
        (Some(Preset::Base), _, _) => SynthSpec::bert_base(),
        (Some(Preset::Large), _, _) => SynthSpec::bert_large(),
        (Some(_), _, _) => unreachable!("real models' presets return above"),
        (None, Some(layers), Some(hidden)) => {
            if layers == 0 {
                return Err(invalid("--layers must be at least 1".into()));
            }
            if hidden == 0 {
                return Err(invalid("--hidden must be at least 1".into()));
            }
            let heads = args.heads.unwrap_or((hidden / 64).max(1));
            if heads == 0 {
                return Err(invalid("--heads must be at least 1".into()));
            }
            let intermediate = args.intermediate.unwrap_or(4 * hidden);
            if intermediate == 0 {
                return Err(invalid("--intermediate must be at least 1".into()));
            }
            SynthSpec::sized(layers, hidden, heads, intermediate)
        }
        _ => {
            return Err(invalid(
                "give --preset base|large, or --layers N and --hidden H".into(),
            ));
        }
    };
    if !spec.hidden.is_multiple_of(spec.heads) {
        return Err(invalid(format!(
            "--hidden {} is not a multiple of --heads {}",
            spec.hidden, spec.heads
        )));
    }
    let head_dim = spec.hidden / spec.heads;
    if head_dim > MAX_HEAD_DIM {
        return Err(invalid(format!(
            "head size {head_dim} (hidden {} / heads {}) is larger than the attention kernel's \
             limit of {MAX_HEAD_DIM}; give --heads {} or more",
            spec.hidden,
            spec.heads,
            spec.hidden.div_ceil(MAX_HEAD_DIM)
        )));
    }
    if !head_dim.is_multiple_of(4) {
        return Err(invalid(format!(
            "head size {head_dim} (hidden {} / heads {}) must be a multiple of 4",
            spec.hidden, spec.heads
        )));
    }
    spec.family = args.family.synth();
    if spec.is_decoder() {
        spec.hidden_act = "silu".into();
    }
    finish_spec(args, &mut spec)?;
    Ok(spec)
}

/// Applies the flags every shape takes (dtype, seed, vocabulary, labels) and
/// checks the config as the engine will.
fn finish_spec(args: &SynthArgs, spec: &mut SynthSpec) -> Result<(), EngineError> {
    spec.dtype = args.dtype.safetensors();
    spec.seed = args.seed;
    if let Some(vocab) = args.vocab {
        spec.vocab_size = vocab;
    }
    match (args.labels, spec.family) {
        (Some(0), _) => return Err(invalid("--labels must be at least 1".into())),
        (Some(_), SynthFamily::Bert | SynthFamily::XlmRoberta) | (None, _) => {
            spec.labels = args.labels
        }
        (Some(_), _) => {
            return Err(invalid(
                "--labels makes BERT and XLM-RoBERTa classifiers only".into(),
            ));
        }
    }
    // What the engine checks when it loads the folder, so that a shape it would
    // refuse is refused here, before minutes of writing.
    spec.model_config(&args.out.join("config.json"))?;
    Ok(())
}

/// Weights in the generated checkpoint.
pub fn parameter_count(spec: &SynthSpec) -> Result<u64, EngineError> {
    Ok(spec
        .tensors()?
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum())
}

fn check_out_dir(out: &Path, force: bool) -> Result<(), EngineError> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(EngineError::InputFile {
                    path: out.into(),
                    problem: "the folder is not empty; give --force to write into it anyway".into(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if out.exists() && !out.is_dir() => Err(EngineError::InputFile {
            path: out.into(),
            problem: format!("not a folder ({e})"),
        }),
        Err(source) => Err(EngineError::Io {
            path: out.into(),
            source,
        }),
    }
}

fn read_tokenizer(path: &Path, spec: &SynthSpec) -> Result<Vec<u8>, EngineError> {
    let json = std::fs::read(path).map_err(|e| EngineError::InputFile {
        path: path.into(),
        problem: format!("cannot read the tokenizer ({e}); give --tokenizer FILE"),
    })?;
    // Parsed once here so that a tokenizer the engine would refuse (broken,
    // or with more tokens than the embedding table has rows) stops the run.
    surf_engine::tokenize::TextTokenizer::from_json(
        path,
        &json,
        spec.max_position_embeddings,
        spec.vocab_size,
    )?;
    Ok(json)
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if unit == "B" {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {unit}")
    }
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let spec = spec_from_args(&args)?;
    check_out_dir(&args.out, args.force)?;
    let tokenizer = read_tokenizer(&args.tokenizer, &spec)?;
    let parameters = parameter_count(&spec)?;
    let expected = parameters * args.dtype.bytes();

    // Generation is one call with no progress of its own; a spinner with the
    // elapsed time shows that a large model is still being written.
    let spinner = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.set_message(format!(
        "writing {parameters} weights ({}) to {}",
        human_bytes(expected),
        args.out.display()
    ));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let start = Instant::now();
    let written = write_model(&args.out, &spec, &tokenizer);
    spinner.finish_and_clear();
    let files = written?;

    let mut bytes = 0u64;
    for name in &files {
        let path = args.out.join(name);
        let metadata = std::fs::metadata(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        bytes += metadata.len();
    }
    println!(
        "wrote {}: {} layers, hidden {}, {} heads, intermediate {}, {:?}, {parameters} parameters, \
         {bytes} bytes ({}) in {:.1} s",
        args.out.display(),
        spec.layers,
        spec.hidden,
        spec.heads,
        spec.intermediate,
        spec.dtype,
        human_bytes(bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
