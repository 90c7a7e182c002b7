//! The Surfing Weights engine: runs sentence-embedding and reranking models
//! (BERT, RoBERTa and XLM-RoBERTa, MPNet, T5 encoders) on any GPU through
//! wgpu. It owns the device (`gpu`), one launcher per WGSL kernel
//! (`kernels`), the model layer, one file per family (`model`), weight
//! loading (`weights`), the
//! tokenizer set-up (`tokenize`), the public [`Engine`], several engines
//! sharing one GPU budget ([`Engines`]) and the request queue that merges
//! concurrent callers into batches and picks the model to run next (`queue`).

pub mod config;
pub mod dtype;
pub mod engine;
pub mod engines;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod paging;
pub mod process_memory;
pub mod queue;
pub mod remote_rows;
pub mod source;
pub mod stats;
pub mod synth;
pub mod tensor_writer;
pub mod tokenize;
pub mod weights;

pub use config::{Activation, ModelSpec, Pooling};
pub use dtype::WeightDtype;
pub use engine::{
    ClassifierInput, Embedding, Engine, EngineBuilder, ModelKind, Prediction, Prompt, ScoreOptions,
};
pub use engines::{Engines, EnginesBuilder, NamedEngine, Residency};
pub use error::{Error, ErrorKind, Result};
pub use gpu::Gpu;
pub use model::{BertConfig, Family, ModelConfig};
pub use paging::{Eviction, PagerConfig, VramBudget};
pub use queue::{BatchLimits, EmbedQueue, Embedded, Fairness, QueueError, Ticket};
pub use source::{LocalSource, RemoteSource, WeightSource};
pub use stats::{CacheInfo, InferenceStats};
pub use tokenize::{Tokens, Truncation};
