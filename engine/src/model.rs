//! The BERT graph. Host side: each module's `load` reads its tensors by
//! checkpoint name and packs them into the layout its GPU buffer uses. GPU side:
//! each module's `forward` records its kernel launches into a `DispatchPlan`.

use crate::config::{Activation, BertConfig};
use crate::dtype::WeightDtype;
use crate::error::Result;
use crate::gpu::Gpu;
use surf_transport::layer_component;

use crate::kernels::autotune::Launchers;
use crate::kernels::choice::{self, ChoiceOrigin};
use crate::kernels::embed::EmbeddingTables;
use crate::kernels::family::{KernelFamily, KernelMode};
use crate::kernels::layernorm::LayerNormOperands;
use crate::kernels::matmul::{Epilogue, MatmulOperands};
use crate::kernels::selection::{ModelShapes, Selection, TunedOp};
use crate::kernels::{DispatchPlan, attention, embed, layernorm, matmul, normalize, pool};
use crate::weights::TensorSource;

fn read_tensor<T: Element>(
    weights: &dyn TensorSource,
    specs: &[(String, Vec<usize>)],
    name: &str,
) -> Result<Vec<T>> {
    let (_, shape) = specs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("tensor {name} is not in its module's list"));
    T::read(weights, name, shape)
}

/// An element type that weights are packed in.
trait Element: bytemuck::Pod + Default {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>>;
}

impl Element for f32 {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>> {
        weights.tensor(name, shape)
    }
}

impl Element for half::f16 {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>> {
        weights.tensor_f16(name, shape)
    }
}

/// A module's weights packed for its GPU buffer, in the engine's weight dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedWeights {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl PackedWeights {
    /// Elements, padding included.
    pub fn len(&self) -> usize {
        match self {
            PackedWeights::F32(data) => data.len(),
            PackedWeights::F16(data) => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes that go into the buffer.
    pub fn bytes(&self) -> &[u8] {
        match self {
            PackedWeights::F32(data) => bytemuck::cast_slice(data),
            PackedWeights::F16(data) => bytemuck::cast_slice(data),
        }
    }

    pub fn dtype(&self) -> WeightDtype {
        match self {
            PackedWeights::F32(_) => WeightDtype::F32,
            PackedWeights::F16(_) => WeightDtype::F16,
        }
    }
}

/// Every tensor the encoder reads, with its shape, in checkpoint order.
pub fn model_tensors(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let mut all = BertEmbeddings::tensors(config);
    for index in 0..config.num_hidden_layers {
        all.extend(BertLayer::tensors(config, index));
    }
    all
}

/// Every launcher the forward pass uses, built once per device, and the
/// kernel family each shape runs.
pub struct Kernels {
    pub matmul: matmul::Matmul,
    pub embed: embed::Embed,
    pub layernorm: layernorm::LayerNorm,
    pub attention: attention::Attention,
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
            embed: embed::Embed::new(gpu, dtype),
            layernorm: layernorm::LayerNorm::new(gpu, dtype),
            attention: attention::Attention::new(gpu),
            pool: pool::Pool::new(gpu),
            normalize: normalize::Normalize::new(gpu),
            selection: Selection::Forced(KernelFamily::fixed_default(gpu)),
        }
    }

    /// Sets the family per shape for a model of `config`: forced by `mode`,
    /// or measured (and cached) on this adapter.
    pub fn choose(
        &mut self,
        gpu: &Gpu,
        mode: KernelMode,
        config: &BertConfig,
    ) -> Result<ChoiceOrigin> {
        let model = ModelShapes {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
        };
        let launchers = Launchers {
            matmul: &self.matmul,
            attention: &self.attention,
            layernorm: &self.layernorm,
        };
        let dtype = self.matmul.dtype().name();
        let (selection, origin) = choice::select(gpu, &launchers, mode, &model, dtype)?;
        self.selection = selection;
        Ok(origin)
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul(
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

    fn layernorm(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        cols: usize,
        eps: f32,
        operands: LayerNormOperands<'_>,
    ) {
        let family = self.selection.family(TunedOp::LayerNorm, rows, cols, 0);
        self.layernorm
            .push_family(family, gpu, plan, rows, cols, eps, operands);
    }
}

/// Lays tensors end to end in one buffer, each starting on a 4-element
/// boundary so that kernels may read them as vec4 (16 bytes of f32, 8 of f16).
/// It moves elements as they are, so f16 words are never widened.
struct Packer<T> {
    data: Vec<T>,
}

impl<T: Element> Packer<T> {
    fn offset(&mut self) -> u32 {
        let aligned = self.data.len().next_multiple_of(4);
        self.data.resize(aligned, T::default());
        aligned as u32
    }

    fn put(&mut self, values: &[T]) -> u32 {
        let offset = self.offset();
        self.data.extend_from_slice(values);
        offset
    }

    /// Appends `weight` ([out, in], as checkpoints store linear layers)
    /// transposed to [in, out], which is the B operand the matmul reads.
    /// The copy walks square blocks so that both sides stay in cache: a
    /// plain row-by-row transpose of a 1536x384 weight misses on every write,
    /// and packing runs on the fetch path of streamed layers.
    fn put_transposed(&mut self, weight: &[T], out_features: usize, in_features: usize) -> u32 {
        const BLOCK: usize = 32;
        let offset = self.offset();
        let start = self.data.len();
        self.data.resize(start + weight.len(), T::default());
        let dst = &mut self.data[start..];
        for o0 in (0..out_features).step_by(BLOCK) {
            let o1 = (o0 + BLOCK).min(out_features);
            for i0 in (0..in_features).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(in_features);
                for o in o0..o1 {
                    let row = &weight[o * in_features + i0..o * in_features + i1];
                    for (i, &value) in (i0..i1).zip(row) {
                        dst[i * out_features + o] = value;
                    }
                }
            }
        }
        offset
    }
}

/// Offsets of the embedding tables and their LayerNorm in the embeddings buffer.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingsLayout {
    pub tables: EmbeddingTables,
    pub gamma: u32,
    pub beta: u32,
}

/// `embeddings.*`: word, position and token-type tables, then LayerNorm.
pub struct BertEmbeddings {
    pub layout: EmbeddingsLayout,
    pub buffer: wgpu::Buffer,
    hidden: usize,
    eps: f32,
}

impl BertEmbeddings {
    /// The checkpoint tensors of this module, with their shapes.
    pub fn tensors(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
        let h = config.hidden_size;
        [
            ("word_embeddings.weight", vec![config.vocab_size, h]),
            (
                "position_embeddings.weight",
                vec![config.max_position_embeddings, h],
            ),
            (
                "token_type_embeddings.weight",
                vec![config.type_vocab_size, h],
            ),
            ("LayerNorm.weight", vec![h]),
            ("LayerNorm.bias", vec![h]),
        ]
        .into_iter()
        .map(|(name, shape)| (format!("embeddings.{name}"), shape))
        .collect()
    }

    /// Reads and packs the `embeddings.*` tensors as `dtype`.
    pub fn pack(
        weights: &dyn TensorSource,
        config: &BertConfig,
        dtype: WeightDtype,
    ) -> Result<(EmbeddingsLayout, PackedWeights)> {
        Ok(match dtype {
            WeightDtype::F32 => {
                let (layout, data) = Self::pack_as::<f32>(weights, config)?;
                (layout, PackedWeights::F32(data))
            }
            WeightDtype::F16 => {
                let (layout, data) = Self::pack_as::<half::f16>(weights, config)?;
                (layout, PackedWeights::F16(data))
            }
        })
    }

    fn pack_as<T: Element>(
        weights: &dyn TensorSource,
        config: &BertConfig,
    ) -> Result<(EmbeddingsLayout, Vec<T>)> {
        let specs = Self::tensors(config);
        let t = |short: &str| read_tensor::<T>(weights, &specs, &format!("embeddings.{short}"));
        let mut packer = Packer { data: Vec::new() };
        let word = packer.put(&t("word_embeddings.weight")?);
        let position = packer.put(&t("position_embeddings.weight")?);
        let token_type = packer.put(&t("token_type_embeddings.weight")?);
        let gamma = packer.put(&t("LayerNorm.weight")?);
        let beta = packer.put(&t("LayerNorm.bias")?);
        let layout = EmbeddingsLayout {
            tables: EmbeddingTables {
                word_offset: word,
                position_offset: position,
                type_offset: token_type,
            },
            gamma,
            beta,
        };
        Ok((layout, packer.data))
    }

    /// Bytes the embeddings buffer holds.
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer.size()
    }

    pub fn load(
        gpu: &Gpu,
        weights: &dyn TensorSource,
        config: &BertConfig,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let (layout, data) = Self::pack(weights, config, dtype)?;
        gpu.check_binding_size("an embeddings buffer", data.bytes().len() as u64)?;
        Ok(Self {
            layout,
            buffer: gpu.storage_buffer_with("embeddings", data.bytes()),
            hidden: config.hidden_size,
            eps: config.layer_norm_eps as f32,
        })
    }

    pub fn forward(
        &self,
        gpu: &Gpu,
        kernels: &Kernels,
        plan: &mut DispatchPlan,
        batch: &BatchBuffers,
    ) {
        let tokens = batch.rows;
        kernels.embed.push(
            gpu,
            plan,
            tokens,
            self.hidden,
            &batch.tokens,
            &self.buffer,
            self.layout.tables,
            &batch.scratch,
        );
        kernels.layernorm(
            gpu,
            plan,
            tokens,
            self.hidden,
            self.eps,
            LayerNormOperands {
                x: &batch.scratch,
                residual: None,
                weights: &self.buffer,
                gamma_offset: self.layout.gamma,
                beta_offset: self.layout.beta,
                out: &batch.hidden,
            },
        );
    }
}

/// Offsets (elements) of one encoder layer's tensors in its buffer. The
/// query, key and value projections are fused into one [hidden, 3 hidden] matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLayout {
    pub qkv_weight: u32,
    pub qkv_bias: u32,
    pub attention_out_weight: u32,
    pub attention_out_bias: u32,
    pub attention_norm_gamma: u32,
    pub attention_norm_beta: u32,
    pub intermediate_weight: u32,
    pub intermediate_bias: u32,
    pub output_weight: u32,
    pub output_bias: u32,
    pub output_norm_gamma: u32,
    pub output_norm_beta: u32,
    /// Size of the whole layer buffer, in elements.
    pub len: usize,
}

/// `encoder.layer.{i}`: self-attention, its output projection and LayerNorm,
/// the intermediate (GELU) and output projections and the second LayerNorm.
pub struct BertLayer;

impl BertLayer {
    /// The checkpoint tensors of layer `index`, with their shapes.
    pub fn tensors(config: &BertConfig, index: usize) -> Vec<(String, Vec<usize>)> {
        let h = config.hidden_size;
        let i = config.intermediate_size;
        [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ]
        .into_iter()
        .map(|(name, shape)| (format!("{}.{name}", layer_component(index)), shape))
        .collect()
    }

    /// Reads and packs the tensors of layer `index` as `dtype`.
    pub fn pack(
        weights: &dyn TensorSource,
        config: &BertConfig,
        index: usize,
        dtype: WeightDtype,
    ) -> Result<(LayerLayout, PackedWeights)> {
        Ok(match dtype {
            WeightDtype::F32 => {
                let (layout, data) = Self::pack_as::<f32>(weights, config, index)?;
                (layout, PackedWeights::F32(data))
            }
            WeightDtype::F16 => {
                let (layout, data) = Self::pack_as::<half::f16>(weights, config, index)?;
                (layout, PackedWeights::F16(data))
            }
        })
    }

    fn pack_as<T: Element>(
        weights: &dyn TensorSource,
        config: &BertConfig,
        index: usize,
    ) -> Result<(LayerLayout, Vec<T>)> {
        let h = config.hidden_size;
        let i = config.intermediate_size;
        let specs = Self::tensors(config, index);
        let t = |short: &str| {
            read_tensor::<T>(
                weights,
                &specs,
                &format!("{}.{short}", layer_component(index)),
            )
        };

        let query = t("attention.self.query.weight")?;
        let key = t("attention.self.key.weight")?;
        let value = t("attention.self.value.weight")?;
        let mut qkv = Vec::with_capacity(3 * h * h);
        qkv.extend_from_slice(&query);
        qkv.extend_from_slice(&key);
        qkv.extend_from_slice(&value);
        let mut qkv_bias = t("attention.self.query.bias")?;
        qkv_bias.extend(t("attention.self.key.bias")?);
        qkv_bias.extend(t("attention.self.value.bias")?);

        // One allocation for the whole layer: growing by doubling would copy
        // megabytes on every fetch.
        let mut packer = Packer {
            data: Vec::with_capacity(4 * h * h + 2 * h * i + 3 * h + i + h + 4 * h + 64),
        };
        let qkv_weight = packer.put_transposed(&qkv, 3 * h, h);
        let qkv_bias = packer.put(&qkv_bias);
        let attention_out_weight =
            packer.put_transposed(&t("attention.output.dense.weight")?, h, h);
        let attention_out_bias = packer.put(&t("attention.output.dense.bias")?);
        let attention_norm_gamma = packer.put(&t("attention.output.LayerNorm.weight")?);
        let attention_norm_beta = packer.put(&t("attention.output.LayerNorm.bias")?);
        let intermediate_weight = packer.put_transposed(&t("intermediate.dense.weight")?, i, h);
        let intermediate_bias = packer.put(&t("intermediate.dense.bias")?);
        let output_weight = packer.put_transposed(&t("output.dense.weight")?, h, i);
        let output_bias = packer.put(&t("output.dense.bias")?);
        let output_norm_gamma = packer.put(&t("output.LayerNorm.weight")?);
        let output_norm_beta = packer.put(&t("output.LayerNorm.bias")?);
        packer.offset();
        let layout = LayerLayout {
            qkv_weight,
            qkv_bias,
            attention_out_weight,
            attention_out_bias,
            attention_norm_gamma,
            attention_norm_beta,
            intermediate_weight,
            intermediate_bias,
            output_weight,
            output_bias,
            output_norm_gamma,
            output_norm_beta,
            len: packer.data.len(),
        };
        Ok((layout, packer.data))
    }

    /// The packed layout of every layer of `config`, computed without
    /// weights. Offsets count elements, so it is the same for every dtype.
    pub fn layout(config: &BertConfig) -> LayerLayout {
        struct Zeros;
        impl TensorSource for Zeros {
            fn tensor(&self, _name: &str, shape: &[usize]) -> Result<Vec<f32>> {
                Ok(vec![0.0; shape.iter().product()])
            }
            fn tensor_f16(&self, _name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
                Ok(vec![half::f16::ZERO; shape.iter().product()])
            }
        }
        match Self::pack_as::<half::f16>(&Zeros, config, 0) {
            Ok((layout, _)) => layout,
            Err(_) => unreachable!("packing zeros cannot fail"),
        }
    }

    /// Records the layer: `batch.hidden` in, `batch.hidden` out.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        gpu: &Gpu,
        kernels: &Kernels,
        plan: &mut DispatchPlan,
        config: &BertConfig,
        activation: Activation,
        layout: &LayerLayout,
        weights: &wgpu::Buffer,
        batch: &BatchBuffers,
    ) {
        let h = config.hidden_size;
        let inter = config.intermediate_size;
        let rows = batch.rows;
        let eps = config.layer_norm_eps as f32;
        kernels.matmul(
            plan,
            rows,
            3 * h,
            h,
            Epilogue::Bias,
            MatmulOperands {
                lhs: &batch.hidden,
                a_offset: 0,
                weights,
                b_offset: layout.qkv_weight,
                bias_offset: layout.qkv_bias,
                out: &batch.qkv,
                c_offset: 0,
            },
        );
        let rows_of_batch = batch.sequences * batch.seq_len;
        let attention_family = kernels.selection.family(
            TunedOp::Attention,
            rows_of_batch,
            config.head_dim(),
            config.num_attention_heads,
        );
        kernels.attention.push_family(
            attention_family,
            plan,
            batch.sequences,
            batch.seq_len,
            config.num_attention_heads,
            config.head_dim(),
            &batch.qkv,
            &batch.mask,
            &batch.context,
        );
        kernels.matmul(
            plan,
            rows,
            h,
            h,
            Epilogue::Bias,
            MatmulOperands {
                lhs: &batch.context,
                a_offset: 0,
                weights,
                b_offset: layout.attention_out_weight,
                bias_offset: layout.attention_out_bias,
                out: &batch.scratch,
                c_offset: 0,
            },
        );
        kernels.layernorm(
            gpu,
            plan,
            rows,
            h,
            eps,
            LayerNormOperands {
                x: &batch.scratch,
                residual: Some(&batch.hidden),
                weights,
                gamma_offset: layout.attention_norm_gamma,
                beta_offset: layout.attention_norm_beta,
                out: &batch.attention_output,
            },
        );
        kernels.matmul(
            plan,
            rows,
            inter,
            h,
            Epilogue::BiasThen(activation),
            MatmulOperands {
                lhs: &batch.attention_output,
                a_offset: 0,
                weights,
                b_offset: layout.intermediate_weight,
                bias_offset: layout.intermediate_bias,
                out: &batch.intermediate,
                c_offset: 0,
            },
        );
        kernels.matmul(
            plan,
            rows,
            h,
            inter,
            Epilogue::Bias,
            MatmulOperands {
                lhs: &batch.intermediate,
                a_offset: 0,
                weights,
                b_offset: layout.output_weight,
                bias_offset: layout.output_bias,
                out: &batch.scratch,
                c_offset: 0,
            },
        );
        kernels.layernorm(
            gpu,
            plan,
            rows,
            h,
            eps,
            LayerNormOperands {
                x: &batch.scratch,
                residual: Some(&batch.attention_output),
                weights,
                gamma_offset: layout.output_norm_gamma,
                beta_offset: layout.output_norm_beta,
                out: &batch.hidden,
            },
        );
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
    pub mask: wgpu::Buffer,
    pub lengths: wgpu::Buffer,
    pub hidden: wgpu::Buffer,
    pub qkv: wgpu::Buffer,
    pub context: wgpu::Buffer,
    pub scratch: wgpu::Buffer,
    pub attention_output: wgpu::Buffer,
    pub intermediate: wgpu::Buffer,
    pub pooled: wgpu::Buffer,
}

impl BatchBuffers {
    pub fn new(gpu: &Gpu, config: &BertConfig, rows: usize, sequences: usize) -> Self {
        let h = config.hidden_size as u64;
        let r = rows as u64;
        let f = 4u64;
        Self {
            capacity_rows: rows,
            capacity_sequences: sequences,
            rows: 0,
            sequences: 0,
            seq_len: 0,
            tokens: gpu.storage_buffer("tokens", r * 3 * 4),
            mask: gpu.storage_buffer("mask", r * f),
            lengths: gpu.storage_buffer("lengths", sequences as u64 * 4),
            hidden: gpu.storage_buffer("hidden", r * h * f),
            qkv: gpu.storage_buffer("qkv", r * 3 * h * f),
            context: gpu.storage_buffer("context", r * h * f),
            scratch: gpu.storage_buffer("scratch", r * h * f),
            attention_output: gpu.storage_buffer("attention_output", r * h * f),
            intermediate: gpu
                .storage_buffer("intermediate", r * config.intermediate_size as u64 * f),
            pooled: gpu.storage_buffer("pooled", sequences as u64 * h * f),
        }
    }

    /// Bytes of the widest activation per row, which bounds rows per batch.
    pub fn widest_row_bytes(config: &BertConfig) -> u64 {
        4 * (3 * config.hidden_size).max(config.intermediate_size) as u64
    }
}

/// Records pooling and, where the model asks for it, L2 normalisation.
pub fn record_head(
    kernels: &Kernels,
    plan: &mut DispatchPlan,
    config: &BertConfig,
    pooling: crate::config::Pooling,
    normalize: bool,
    batch: &BatchBuffers,
) {
    kernels.pool.push(
        plan,
        batch.sequences,
        batch.seq_len,
        config.hidden_size,
        pooling,
        &batch.hidden,
        &batch.lengths,
        &batch.pooled,
    );
    if normalize {
        kernels
            .normalize
            .push(plan, batch.sequences, config.hidden_size, &batch.pooled);
    }
}

#[cfg(test)]
mod tests {
    use super::Packer;

    #[test]
    fn blocked_transpose_matches_the_definition() {
        // Sizes that are not multiples of the block, after an unaligned tensor.
        for (out_features, in_features) in [(37, 70), (1, 5), (64, 33), (3, 1)] {
            let weight: Vec<f32> = (0..out_features * in_features)
                .map(|v| v as f32 * 0.5 - 7.0)
                .collect();
            let mut packer = Packer::<f32> { data: Vec::new() };
            packer.put(&[1.0, 2.0, 3.0]);
            let offset = packer.put_transposed(&weight, out_features, in_features) as usize;
            assert_eq!(offset, 4);
            for o in 0..out_features {
                for i in 0..in_features {
                    assert_eq!(
                        packer.data[offset + i * out_features + o],
                        weight[o * in_features + i],
                        "element ({o}, {i}) of a {out_features}x{in_features} weight"
                    );
                }
            }
        }
    }
}
