//! The model layer: one file per family (`bert`, `roberta`, `mpnet`, `t5`,
//! `modernbert`, `llama` for the LLaMA lineage of decoders, `gpt2`),
//! each a serde config mirroring `config.json` and modules that pack their
//! checkpoint tensors (host) and record their kernels (GPU). What families
//! share (embedding sums, self-attention, feed-forward, norms, the relative
//! position bias) is in `blocks`; the sentence-transformers head and the
//! classification heads are in `head`.
//!
//! What the pager and the weight server call a component comes from here
//! too: the pinned `embeddings` component (every tensor all layers share),
//! one component per layer named after the family's own prefix
//! (`encoder.layer.N`, `encoder.block.N`), and the `head` of classifiers.

pub mod bert;
pub mod blocks;
pub mod gpt2;
pub mod head;
pub mod llama;
pub mod modernbert;
pub mod mpnet;
pub mod packing;
pub mod roberta;
pub mod rope;
pub mod t5;

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::autotune::Launchers;
use crate::kernels::choice::{self, ChoiceOrigin};
use crate::kernels::family::{KernelFamily, KernelMode};
use crate::kernels::layernorm::{LayerNormOperands, NormOptions};
use crate::kernels::matmul::{Epilogue, MatmulOperands};
use crate::kernels::rotary::RotaryTables;
use crate::kernels::selection::{ModelShapes, Selection, TunedOp};
use crate::kernels::{
    DispatchPlan, attention, embed, gate, layernorm, matmul, matmul_norm, normalize, pool, rotary,
};
use crate::weights::TensorSource;

pub use bert::BertConfig;
pub use gpt2::Gpt2Config;
pub use llama::LlamaConfig;
pub use modernbert::ModernBertConfig;
pub use mpnet::MPNetConfig;
pub use packing::PackedWeights;
pub use t5::T5Config;

/// The `model_type` values the engine runs.
pub const SUPPORTED_MODEL_TYPES: &str = "bert, roberta, xlm-roberta, camembert, mpnet, t5, modernbert, llama, mistral, qwen2, qwen3, gpt2";

/// The component holding every tensor that all layers share.
pub const PINNED_COMPONENT: &str = "embeddings";
/// The component holding a classifier's head (BERT's pooler, the classifier).
pub const HEAD_COMPONENT: &str = "head";

/// A model family: how a checkpoint is laid out and computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    MPNet,
    T5,
    /// LLaMA, Mistral, Qwen2 and Qwen3 decoders.
    Llama,
    ModernBert,
    Gpt2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::MPNet => "mpnet",
            Family::T5 => "t5",
            Family::Llama => "llama",
            Family::ModernBert => "modernbert",
            Family::Gpt2 => "gpt2",
        }
    }
}

/// The sizes a forward pass is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Width of the feed-forward's inner activation (one branch when gated).
    pub ffn: usize,
    pub gated: bool,
    pub layers: usize,
    pub vocab: usize,
    /// Rows of the token-type table; 0 for families without one.
    pub type_vocab: usize,
    /// Buckets of the relative position bias; 0 for families without one.
    pub relative_buckets: usize,
    /// Key/value heads: fewer than `heads` in grouped-query attention.
    pub kv_heads: usize,
    /// Rotary tables (distinct thetas) the layers use; 0 without rotary.
    pub rotary_tables: usize,
}

impl Dims {
    /// Where the attention finds each head.
    pub fn head_layout(&self) -> crate::kernels::attention::HeadLayout {
        crate::kernels::attention::HeadLayout {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Width of the attention's queries, keys and values, which T5 lets
    /// differ from the hidden size.
    pub fn attention_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Token types an input may carry: none but 0 without a table.
    pub fn token_types(&self) -> usize {
        self.type_vocab.max(1)
    }
}

/// Where a checkpoint tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Pinned,
    Layer(usize),
    Head,
}

/// `config.json`, read as the family its `model_type` names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Bert(BertConfig),
    /// RoBERTa, XLM-RoBERTa and CamemBERT: BERT's config and layers, with
    /// positions counted from `pad_token_id + 1`.
    Roberta(BertConfig),
    MPNet(MPNetConfig),
    T5(T5Config),
    /// LLaMA, Mistral, Qwen2 and Qwen3: one lineage of decoders.
    Llama(LlamaConfig),
    ModernBert(ModernBertConfig),
    Gpt2(Gpt2Config),
}

#[derive(Deserialize)]
struct FamilyProbe {
    model_type: Option<String>,
}

impl ModelConfig {
    /// Reads `config.json` (`path` names it in errors) and checks what the
    /// kernels rely on.
    pub fn from_json(path: &Path, bytes: &[u8]) -> Result<Self> {
        let parse = |bytes: &[u8]| -> Result<serde_json::Value> {
            serde_json::from_slice(bytes).map_err(|source| Error::Json {
                path: path.into(),
                source,
            })
        };
        let value = parse(bytes)?;
        let probe: FamilyProbe = typed(path, value.clone())?;
        // Checkpoints from before `model_type` existed are BERT's.
        let model_type = probe.model_type.unwrap_or_else(|| "bert".into());
        let config = match model_type.as_str() {
            "bert" => ModelConfig::Bert(typed(path, value)?),
            "roberta" | "xlm-roberta" | "camembert" => ModelConfig::Roberta(typed(path, value)?),
            "mpnet" => ModelConfig::MPNet(typed(path, value)?),
            "t5" => ModelConfig::T5(typed(path, value)?),
            "llama" | "mistral" | "qwen2" | "qwen3" => ModelConfig::Llama(typed(path, value)?),
            "modernbert" => ModelConfig::ModernBert(typed(path, value)?),
            "gpt2" => ModelConfig::Gpt2(typed(path, value)?),
            other => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    field: "model_type",
                    value: other.into(),
                    supported: SUPPORTED_MODEL_TYPES,
                });
            }
        };
        config.validate(path)?;
        Ok(config)
    }

    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Bert(_) => Family::Bert,
            ModelConfig::Roberta(_) => Family::Roberta,
            ModelConfig::MPNet(_) => Family::MPNet,
            ModelConfig::T5(_) => Family::T5,
            ModelConfig::Llama(_) => Family::Llama,
            ModelConfig::ModernBert(_) => Family::ModernBert,
            ModelConfig::Gpt2(_) => Family::Gpt2,
        }
    }

    pub fn dims(&self) -> Dims {
        match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) => c.dims(),
            ModelConfig::MPNet(c) => c.dims(),
            ModelConfig::T5(c) => c.dims(),
            ModelConfig::Llama(c) => c.dims(),
            ModelConfig::ModernBert(c) => c.dims(),
            ModelConfig::Gpt2(c) => c.dims(),
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.dims().hidden
    }

    pub fn num_layers(&self) -> usize {
        self.dims().layers
    }

    pub fn vocab_size(&self) -> usize {
        self.dims().vocab
    }

    pub fn pad_token_id(&self) -> u32 {
        match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) => c.pad_token_id as u32,
            ModelConfig::MPNet(c) => c.pad_token_id as u32,
            ModelConfig::T5(c) => c.pad_token_id as u32,
            ModelConfig::Llama(c) => c.pad_token_id.unwrap_or(0) as u32,
            ModelConfig::ModernBert(c) => c.pad_token_id as u32,
            ModelConfig::Gpt2(c) => c.pad_token_id.unwrap_or(0) as u32,
        }
    }

    /// The position id of token `p`: BERT counts from 0, RoBERTa and MPNet
    /// from `pad_token_id + 1`; T5 has no position table.
    pub fn position_id(&self, p: usize) -> u32 {
        match self {
            ModelConfig::Bert(_)
            | ModelConfig::T5(_)
            | ModelConfig::Llama(_)
            | ModelConfig::ModernBert(_)
            | ModelConfig::Gpt2(_) => p as u32,
            ModelConfig::Roberta(c) => roberta::position_id(c, p),
            ModelConfig::MPNet(c) => mpnet::position_id(c, p),
        }
    }

    /// The longest input the position table allows, where there is one.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            ModelConfig::Bert(c) => Some(c.max_position_embeddings),
            ModelConfig::Roberta(c) => Some(roberta::max_positions(c)),
            ModelConfig::MPNet(c) => Some(mpnet::max_positions(c)),
            ModelConfig::T5(_) => None,
            ModelConfig::Llama(c) => Some(c.max_position_embeddings),
            ModelConfig::ModernBert(c) => Some(c.max_position_embeddings),
            ModelConfig::Gpt2(c) => Some(c.n_positions),
        }
    }

    /// Prefixes the base model's tensors carry in checkpoints saved with a
    /// head (`BertForSequenceClassification` saves `bert.embeddings...`).
    pub fn checkpoint_prefixes(&self) -> &'static [&'static str] {
        match self {
            ModelConfig::Bert(_) => &["bert."],
            ModelConfig::Roberta(_) => &["roberta."],
            ModelConfig::MPNet(_) => &["mpnet."],
            ModelConfig::T5(_) => &[],
            ModelConfig::Llama(_) | ModelConfig::ModernBert(_) => &["model."],
            ModelConfig::Gpt2(_) => &["transformer."],
        }
    }

    /// A tensor every checkpoint of the family has, to find its prefix by.
    pub fn anchor_tensor(&self) -> &'static str {
        match self {
            ModelConfig::T5(_) => t5::SHARED_EMBEDDINGS,
            ModelConfig::Llama(_) => llama::EMBED_TOKENS,
            ModelConfig::ModernBert(_) => modernbert::TOKEN_EMBEDDINGS,
            ModelConfig::Gpt2(_) => gpt2::TOKEN_EMBEDDINGS,
            _ => bert::WORD_EMBEDDINGS,
        }
    }

    /// The prefix of layer `N`'s tensors and component: `{prefix}.N`.
    pub fn layer_prefix(&self) -> &'static str {
        match self {
            ModelConfig::T5(_) => t5::LAYER_PREFIX,
            ModelConfig::Llama(_) => llama::LAYER_PREFIX,
            ModelConfig::ModernBert(_) => modernbert::LAYER_PREFIX,
            ModelConfig::Gpt2(_) => gpt2::LAYER_PREFIX,
            _ => bert::LAYER_PREFIX,
        }
    }

    pub fn layer_component(&self, index: usize) -> String {
        format!("{}.{index}", self.layer_prefix())
    }

    pub fn component_name(&self, component: Component) -> String {
        match component {
            Component::Pinned => PINNED_COMPONENT.into(),
            Component::Head => HEAD_COMPONENT.into(),
            Component::Layer(index) => self.layer_component(index),
        }
    }

    /// The component a tensor (named without the checkpoint prefix) belongs
    /// to; `None` for tensors the engine never reads (a T5 decoder, a
    /// masked-language-model head), which the weight server does not serve.
    pub fn component_of(&self, name: &str) -> Option<Component> {
        if let Some(index) = layer_index(name, self.layer_prefix()) {
            // T5 keeps its relative position table in the first block, yet
            // every block uses it.
            if matches!(self, ModelConfig::T5(_)) && name.contains("relative_attention_bias") {
                return Some(Component::Pinned);
            }
            return Some(Component::Layer(index));
        }
        let pinned = match self {
            ModelConfig::T5(_) => t5::is_pinned(name),
            ModelConfig::MPNet(_) => mpnet::is_pinned(name),
            ModelConfig::Llama(_) => llama::is_pinned(name),
            ModelConfig::ModernBert(_) => modernbert::is_pinned(name),
            ModelConfig::Gpt2(_) => gpt2::is_pinned(name),
            _ => name.starts_with("embeddings."),
        };
        if pinned {
            return Some(Component::Pinned);
        }
        let head = match self {
            ModelConfig::T5(_)
            | ModelConfig::Llama(_)
            | ModelConfig::ModernBert(_)
            | ModelConfig::Gpt2(_) => false,
            _ => name.starts_with("pooler.") || name.starts_with("classifier."),
        };
        head.then_some(Component::Head)
    }

    /// The family's model, ready to pack weights and record kernels.
    pub fn architecture(&self) -> Arc<dyn Architecture> {
        match self {
            ModelConfig::Bert(c) => Arc::new(bert::Bert::new(self.clone(), c)),
            ModelConfig::Roberta(c) => Arc::new(bert::Bert::new(self.clone(), c)),
            ModelConfig::MPNet(c) => Arc::new(mpnet::MPNet::new(self.clone(), c)),
            ModelConfig::T5(c) => Arc::new(t5::T5::new(self.clone(), c)),
            ModelConfig::Llama(c) => Arc::new(llama::Llama::new(self.clone(), c)),
            ModelConfig::ModernBert(c) => Arc::new(modernbert::ModernBert::new(self.clone(), c)),
            ModelConfig::Gpt2(c) => Arc::new(gpt2::Gpt2::new(self.clone(), c)),
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) => c.validate(path)?,
            ModelConfig::MPNet(c) => c.validate(path)?,
            ModelConfig::T5(c) => c.validate(path)?,
            ModelConfig::Llama(c) => c.validate(path)?,
            ModelConfig::ModernBert(c) => c.validate(path)?,
            ModelConfig::Gpt2(c) => c.validate(path)?,
        }
        let table_rows = match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) => Some(c.max_position_embeddings),
            ModelConfig::MPNet(c) => Some(c.max_position_embeddings),
            ModelConfig::Gpt2(c) => Some(c.n_positions),
            ModelConfig::T5(_) | ModelConfig::Llama(_) | ModelConfig::ModernBert(_) => None,
        };
        validate_dims(path, &self.dims(), table_rows)?;
        if self.max_positions() == Some(0) {
            return Err(Error::bad_model(
                path,
                "max_position_embeddings leaves no position after the padding offset",
            ));
        }
        Ok(())
    }
}

fn typed<T: serde::de::DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

/// `N` when `name` is `{prefix}.N.<rest>`.
fn layer_index(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
    let (index, tail) = rest.split_once('.')?;
    (!tail.is_empty()).then_some(())?;
    index.parse().ok()
}

/// The largest value accepted per dimension: several times the largest
/// checkpoints of these families, small enough that nothing sized from them
/// overflows.
const DIMENSION_LIMITS: [(&str, usize); 7] = [
    ("vocab_size", 1 << 20),
    ("hidden_size", 8192),
    ("num_hidden_layers", 256),
    ("num_attention_heads", 256),
    ("intermediate_size", 65536),
    ("max_position_embeddings", 65536),
    ("type_vocab_size", 1024),
];

/// Checks the sizes every family's kernels rely on; `position_rows` is the
/// position table's, for families that have one.
fn validate_dims(path: &Path, dims: &Dims, position_rows: Option<usize>) -> Result<()> {
    let positions = position_rows.unwrap_or(0);
    let checked = [
        ("vocab_size", dims.vocab, true),
        ("hidden_size", dims.hidden, true),
        ("num_hidden_layers", dims.layers, true),
        ("num_attention_heads", dims.heads, true),
        ("intermediate_size", dims.ffn, true),
        (
            "max_position_embeddings",
            positions,
            position_rows.is_some(),
        ),
        ("type_vocab_size", dims.type_vocab, false),
    ];
    for (name, value, required) in checked {
        if required && value == 0 {
            return Err(Error::bad_model(path, format!("`{name}` must be positive")));
        }
        // Buffers are sized from these before any adapter limit is known,
        // so a config from a file or a server is bounded first.
        if let Some(&(_, largest)) = DIMENSION_LIMITS.iter().find(|(n, _)| *n == name)
            && value > largest
        {
            return Err(Error::bad_model(
                path,
                format!("`{name}` is {value}, more than the largest supported, {largest}"),
            ));
        }
    }
    if dims.head_dim == 0 {
        return Err(Error::bad_model(path, "the head size must be positive"));
    }
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(Error::bad_model(
            path,
            format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                dims.heads, dims.kv_heads
            ),
        ));
    }
    // Kernels address a layer and the tables with 32-bit element offsets.
    let h = dims.hidden;
    let layout = dims.head_layout();
    let width = layout.row_width() + layout.query_width();
    let ffn = dims.ffn * if dims.gated { 3 } else { 2 };
    let layer_elements = h
        .checked_mul(width + ffn + 9)
        .and_then(|n| n.checked_add(dims.ffn * 2 + 3 * layout.row_width()));
    let table_elements = (dims.vocab + positions + dims.type_vocab).checked_mul(h);
    for (what, elements) in [
        ("one layer", layer_elements),
        ("the embedding tables", table_elements),
    ] {
        if elements.is_none_or(|n| n > u32::MAX as usize) {
            return Err(Error::bad_model(
                path,
                format!("{what} would hold more than 2^32 elements"),
            ));
        }
    }
    if !dims.head_dim.is_multiple_of(4) || !h.is_multiple_of(4) {
        return Err(Error::bad_model(
            path,
            format!(
                "head size {} and hidden size {h} must be multiples of 4",
                dims.head_dim
            ),
        ));
    }
    if dims.head_dim > attention::MAX_HEAD_DIM {
        return Err(Error::bad_model(
            path,
            format!(
                "head size {} is larger than the attention kernel's {}",
                dims.head_dim,
                attention::MAX_HEAD_DIM
            ),
        ));
    }
    Ok(())
}

/// Checks `layer_types` (transformers 5's per-layer attention kinds), where
/// a config has it: one entry per layer, each a kind the engine runs.
pub(crate) fn validate_layer_types(
    path: &Path,
    types: Option<&[String]>,
    layers: usize,
) -> Result<()> {
    let Some(types) = types else {
        return Ok(());
    };
    if types.len() != layers {
        return Err(Error::bad_model(
            path,
            format!(
                "layer_types has {} entries for {layers} layers",
                types.len()
            ),
        ));
    }
    if let Some(other) = types
        .iter()
        .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
    {
        return Err(Error::Unsupported {
            path: path.into(),
            field: "layer_types",
            value: other.clone(),
            supported: "full_attention, sliding_attention",
        });
    }
    Ok(())
}

/// What the engine and the pager need of a family: packing its pinned
/// tensors and its layers, and recording its kernels.
pub trait Architecture: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Packs the pinned weights the GPU reads (position and type tables,
    /// norms), everything of the pinned component but the word table.
    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights>;

    /// Packs layer `index`.
    fn pack_layer(
        &self,
        source: &dyn TensorSource,
        index: usize,
        dtype: WeightDtype,
    ) -> Result<PackedWeights>;

    /// Elements of one packed layer, the same for every layer and dtype.
    fn layer_len(&self) -> usize;

    /// The word table's checkpoint name, gathered row by row on the host.
    fn word_table(&self, source: &dyn TensorSource) -> &'static str;

    /// The relative position bias the layers share, for families that have one.
    fn relative_bias(&self, _source: &dyn TensorSource) -> Result<Option<blocks::RelativeBias>> {
        Ok(None)
    }

    /// The rotary tables the layers read, for families with rotary positions.
    fn rotary(&self) -> Option<RotaryTables> {
        None
    }

    /// Records the embedding sum (and its norm) into `batch.hidden`.
    fn record_embeddings(&self, cx: &Recorder<'_>, plan: &mut DispatchPlan, pinned: &wgpu::Buffer);

    /// Records layer `index`, whose packed weights are in `weights`.
    fn record_layer(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        index: usize,
        weights: &wgpu::Buffer,
    );

    /// Records what follows the last layer (T5's final norm) and returns the
    /// buffer holding the final token states.
    fn record_final<'b>(
        &self,
        cx: &Recorder<'b>,
        plan: &mut DispatchPlan,
        pinned: &wgpu::Buffer,
    ) -> &'b wgpu::Buffer;
}

/// Every tensor a model reads, with its shape: the word table, the pinned
/// tensors and every layer's, as packing asks for them.
pub fn model_tensors(arch: &dyn Architecture) -> Result<Vec<(String, Vec<usize>)>> {
    let recorder = ShapeRecorder::default();
    let dims = arch.config().dims();
    recorder.record(arch.word_table(&recorder), &[dims.vocab, dims.hidden]);
    arch.pack_pinned(&recorder, WeightDtype::F16)?;
    arch.relative_bias(&recorder)?;
    for index in 0..dims.layers {
        arch.pack_layer(&recorder, index, WeightDtype::F16)?;
    }
    Ok(recorder.into_list())
}

/// A tensor source that hands out zeros and notes every name and shape asked for.
#[derive(Default)]
pub struct ShapeRecorder {
    asked: RefCell<Vec<(String, Vec<usize>)>>,
}

impl ShapeRecorder {
    fn record(&self, name: &str, shape: &[usize]) {
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|(n, _)| n == name) {
            asked.push((name.to_string(), shape.to_vec()));
        }
    }

    pub fn into_list(self) -> Vec<(String, Vec<usize>)> {
        self.asked.into_inner()
    }
}

impl TensorSource for ShapeRecorder {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.record(name, shape);
        Ok(vec![0.0; shape.iter().product()])
    }
    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.record(name, shape);
        Ok(vec![half::f16::ZERO; shape.iter().product()])
    }
}

/// What a module records with: the device, the launchers and the batch.
pub struct Recorder<'a> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels,
    pub batch: &'a BatchBuffers,
}

/// Every launcher the forward pass uses, built once per device, and the
/// kernel family each shape runs.
pub struct Kernels {
    pub matmul: matmul::Matmul,
    pub matmul_norm: matmul_norm::MatmulNorm,
    pub embed: embed::Embed,
    pub layernorm: layernorm::LayerNorm,
    pub attention: attention::Attention,
    pub gate: gate::Gate,
    pub rotary: rotary::Rotary,
    pub pool: pool::Pool,
    pub normalize: normalize::Normalize,
    pub selection: Selection,
}

impl Kernels {
    /// The launchers for weights stored as `dtype`, running the kernels of
    /// [`KernelFamily::fixed_default`] until [`Kernels::choose`] measures.
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        Self {
            matmul: matmul::Matmul::new(gpu, dtype),
            matmul_norm: matmul_norm::MatmulNorm::new(gpu, dtype),
            embed: embed::Embed::new(gpu, dtype),
            layernorm: layernorm::LayerNorm::new(gpu, dtype),
            attention: attention::Attention::new(gpu),
            gate: gate::Gate::new(gpu),
            rotary: rotary::Rotary::new(gpu, dtype),
            pool: pool::Pool::new(gpu),
            normalize: normalize::Normalize::new(gpu),
            selection: Selection::Forced(KernelFamily::fixed_default(gpu)),
        }
    }

    /// Sets the family per shape for a model of `dims`: forced by `mode`,
    /// or measured (and cached) on this adapter.
    pub fn choose(&mut self, gpu: &Gpu, mode: KernelMode, dims: &Dims) -> Result<ChoiceOrigin> {
        let model = ModelShapes {
            hidden: dims.hidden,
            intermediate: dims.ffn,
            heads: dims.heads,
            head_dim: dims.head_dim,
        };
        let launchers = Launchers {
            matmul: &self.matmul,
            attention: &self.attention,
            layernorm: &self.layernorm,
            matmul_norm: &self.matmul_norm,
        };
        let dtype = self.matmul.dtype().name();
        let (selection, origin) = choice::select(gpu, &launchers, mode, &model, dtype)?;
        self.selection = selection;
        Ok(origin)
    }

    pub(crate) fn matmul(
        &self,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        let family = self.selection.family(TunedOp::Matmul, m, k, n);
        self.matmul
            .push_family(family, plan, m, n, k, epilogue, operands);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        cols: usize,
        eps: f32,
        options: NormOptions,
        operands: LayerNormOperands<'_>,
    ) {
        let family = self.selection.family(TunedOp::LayerNorm, rows, cols, 0);
        self.layernorm
            .push_with(family, gpu, plan, rows, cols, eps, options, operands);
    }
}

/// The activations of one padded batch, sized for a capacity and reused while
/// batches fit in it.
pub struct BatchBuffers {
    pub capacity_rows: usize,
    pub capacity_sequences: usize,
    /// Rows in use: sequences * seq_len.
    pub rows: usize,
    pub sequences: usize,
    pub seq_len: usize,
    /// (word id, position id, token type id) per row.
    pub tokens: wgpu::Buffer,
    /// Each row's word embedding, gathered on the host.
    pub word_rows: wgpu::Buffer,
    pub mask: wgpu::Buffer,
    pub lengths: wgpu::Buffer,
    /// `[heads, 2 * seq_len - 1]` relative position biases, where the
    /// family has them.
    pub position_bias: Option<wgpu::Buffer>,
    /// `[tables, seq_len, head_dim / 2]` (cos, sin) pairs, where the family
    /// has rotary positions.
    pub rotary: Option<wgpu::Buffer>,
    pub hidden: wgpu::Buffer,
    pub qkv: wgpu::Buffer,
    pub context: wgpu::Buffer,
    pub scratch: wgpu::Buffer,
    /// The attention's normalised output (post-norm), or the normalised
    /// input of a sublayer (pre-norm).
    pub attention_output: wgpu::Buffer,
    pub intermediate: wgpu::Buffer,
    /// The gated feed-forward's `act(gate) * up`.
    pub gated: Option<wgpu::Buffer>,
    /// Sentence vectors, and their projections through the head.
    pub pooled: wgpu::Buffer,
    pub projected: wgpu::Buffer,
}

impl BatchBuffers {
    pub fn new(gpu: &Gpu, dims: &Dims, head_width: usize, rows: usize, sequences: usize) -> Self {
        let h = dims.hidden as u64;
        let layout = dims.head_layout();
        let r = rows as u64;
        let f = 4u64;
        let branches = if dims.gated { 2 } else { 1 };
        let pooled_bytes = sequences as u64 * head_width.max(dims.hidden) as u64 * f;
        Self {
            capacity_rows: rows,
            capacity_sequences: sequences,
            rows: 0,
            sequences: 0,
            seq_len: 0,
            tokens: gpu.storage_buffer("tokens", r * 3 * 4),
            word_rows: gpu.storage_buffer("word rows", r * h * f),
            mask: gpu.storage_buffer("mask", r * f),
            lengths: gpu.storage_buffer("lengths", sequences as u64 * 4),
            position_bias: (dims.relative_buckets > 0)
                .then(|| gpu.storage_buffer("position bias", dims.heads as u64 * 2 * r * f)),
            rotary: (dims.rotary_tables > 0).then(|| {
                let pairs = (dims.rotary_tables * dims.head_dim / 2) as u64;
                gpu.storage_buffer("rotary tables", pairs * 2 * r * f)
            }),
            hidden: gpu.storage_buffer("hidden", r * h * f),
            qkv: gpu.storage_buffer("qkv", r * layout.row_width() as u64 * f),
            context: gpu.storage_buffer("context", r * layout.query_width() as u64 * f),
            scratch: gpu.storage_buffer("scratch", r * h * f),
            attention_output: gpu.storage_buffer("attention_output", r * h * f),
            intermediate: gpu.storage_buffer("intermediate", r * (branches * dims.ffn) as u64 * f),
            gated: dims
                .gated
                .then(|| gpu.storage_buffer("gated", r * dims.ffn as u64 * f)),
            pooled: gpu.storage_buffer("pooled", pooled_bytes),
            projected: gpu.storage_buffer("projected", pooled_bytes),
        }
    }

    /// Bytes of the widest activation per row, which bounds rows per batch.
    pub fn widest_row_bytes(dims: &Dims) -> u64 {
        let branches = if dims.gated { 2 } else { 1 };
        4 * dims
            .head_layout()
            .row_width()
            .max(branches * dims.ffn)
            .max(dims.rotary_tables * dims.head_dim)
            .max(dims.hidden)
            .max(2 * dims.heads) as u64
    }
}

/// Reads `config.json`'s activation name as one the kernels fuse.
pub fn hidden_activation(path: &Path, field: &'static str, name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu" => Activation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(Error::Unsupported {
                path: path.into(),
                field,
                value: other.into(),
                supported: "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu",
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Component, ModelConfig};

    fn config(json: serde_json::Value) -> crate::error::Result<ModelConfig> {
        ModelConfig::from_json(Path::new("config.json"), json.to_string().as_bytes())
    }

    fn minilm_with(field: &str, value: u64) -> serde_json::Value {
        let mut json = serde_json::json!({
            "model_type": "bert",
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2,
        });
        json[field] = value.into();
        json
    }

    #[test]
    fn absurd_dimensions_are_refused_before_anything_is_sized_from_them() {
        assert!(config(minilm_with("hidden_size", 384)).is_ok());
        for (field, value) in [
            ("hidden_size", 1 << 40),
            ("num_hidden_layers", 1 << 20),
            ("intermediate_size", u64::MAX / 2),
            ("vocab_size", 1 << 33),
            ("max_position_embeddings", 1 << 31),
            ("num_attention_heads", 1 << 20),
            ("type_vocab_size", 1 << 30),
        ] {
            let error = config(minilm_with(field, value)).expect_err("refused");
            assert!(error.to_string().contains(field), "{field}: {error}");
            assert!(error.is_bad_input());
        }
    }

    #[test]
    fn dimensions_within_bounds_whose_tables_overflow_32_bit_offsets_are_refused() {
        // 1M tokens of 8192: 2^33 elements in the word table.
        let mut json = minilm_with("vocab_size", 1 << 20);
        json["hidden_size"] = 8192.into();
        json["num_attention_heads"] = 128.into();
        let error = config(json).expect_err("refused");
        assert!(error.to_string().contains("2^32"), "{error}");
    }

    #[test]
    fn an_unknown_model_type_is_named_with_the_supported_ones() {
        let mut json = minilm_with("hidden_size", 384);
        json["model_type"] = "gpt_neox".into();
        let error = config(json).expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("gpt_neox"), "{message}");
        assert!(
            message.contains("xlm-roberta") && message.contains("t5"),
            "{message}"
        );
        assert!(error.is_bad_input());
    }

    #[test]
    fn components_follow_each_family_layout() {
        let bert = config(minilm_with("hidden_size", 384)).expect("bert");
        assert_eq!(
            bert.component_of("encoder.layer.11.output.dense.bias"),
            Some(Component::Layer(11))
        );
        assert_eq!(
            bert.component_of("embeddings.word_embeddings.weight"),
            Some(Component::Pinned)
        );
        assert_eq!(
            bert.component_of("pooler.dense.weight"),
            Some(Component::Head)
        );
        assert_eq!(bert.component_of("classifier.bias"), Some(Component::Head));
        assert_eq!(bert.component_of("cls.predictions.bias"), None);
        assert_eq!(bert.component_of("encoder.layer.x.output"), None);
        assert_eq!(bert.layer_component(3), "encoder.layer.3");

        let t5 = config(serde_json::json!({
            "model_type": "t5", "vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64,
            "num_layers": 2, "num_heads": 4,
        }))
        .expect("t5");
        assert_eq!(t5.layer_component(1), "encoder.block.1");
        assert_eq!(
            t5.component_of("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
            Some(Component::Layer(1))
        );
        assert_eq!(
            t5.component_of("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            Some(Component::Pinned)
        );
        assert_eq!(t5.component_of("shared.weight"), Some(Component::Pinned));
        assert_eq!(
            t5.component_of("encoder.final_layer_norm.weight"),
            Some(Component::Pinned)
        );
        assert_eq!(
            t5.component_of("decoder.block.0.layer.0.SelfAttention.q.weight"),
            None
        );
        assert_eq!(t5.component_of("lm_head.weight"), None);
    }
}
