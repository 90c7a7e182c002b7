//! What follows the encoder: the sentence-transformers head (pooling, Dense
//! projections, normalisation), or a sequence classifier's head (the first
//! token's state, a dense layer with tanh, the projection onto the labels).

use std::path::Path;

use crate::config::{Activation, ModelSpec, Pooling};
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::DispatchPlan;
use crate::weights::{SafetensorsBytes, TensorSource};

use super::blocks::Linear;
use super::packing::{Element, PackedWeights, Packer, for_dtype};
use super::{ModelConfig, Recorder};

/// The architectures whose classification head the engine runs.
pub const SUPPORTED_CLASSIFIERS: &str = "BertForSequenceClassification, \
     RobertaForSequenceClassification, XLMRobertaForSequenceClassification";

/// One projection of the head: its tensors' name and size, and activation.
struct ProjectionSpec {
    name: String,
    in_features: usize,
    out_features: usize,
    bias: bool,
    activation: Activation,
}

pub struct Head {
    pooling: Pooling,
    projections: Vec<(Linear, Activation)>,
    normalize: bool,
    /// The projections' weights, pinned beside the embeddings.
    buffer: Option<wgpu::Buffer>,
    width: usize,
    dimension: usize,
}

/// The head's tensor sources: the model's own `head` component, and each
/// Dense module's weights file under its folder's name.
struct HeadSources<'a> {
    model: Option<&'a dyn TensorSource>,
    modules: Vec<(String, SafetensorsBytes)>,
}

impl HeadSources<'_> {
    fn route(&self, name: &str) -> Result<(&dyn TensorSource, String)> {
        for (folder, source) in &self.modules {
            if let Some(rest) = name
                .strip_prefix(folder.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                return Ok((source, rest.to_string()));
            }
        }
        match self.model {
            Some(model) => Ok((model, name.to_string())),
            None => Err(Error::WeightSource(format!(
                "the head's tensor {name} has no source"
            ))),
        }
    }
}

impl TensorSource for HeadSources<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (source, name) = self.route(name)?;
        source.tensor(&name, shape)
    }

    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        let (source, name) = self.route(name)?;
        source.tensor_f16(&name, shape)
    }
}

/// The classifier head's projections of `config`'s family.
fn classifier_projections(
    origin: &Path,
    config: &ModelConfig,
    labels: usize,
) -> Result<Vec<ProjectionSpec>> {
    let hidden = config.hidden_size();
    let (dense, out) = match config {
        ModelConfig::Bert(_) => ("pooler.dense", "classifier"),
        ModelConfig::Roberta(_) => ("classifier.dense", "classifier.out_proj"),
        ModelConfig::MPNet(_)
        | ModelConfig::T5(_)
        | ModelConfig::Llama(_)
        | ModelConfig::ModernBert(_)
        | ModelConfig::Gpt2(_) => {
            return Err(Error::Unsupported {
                path: origin.join(crate::config::CONFIG_FILE),
                field: "architectures",
                value: format!("a {} sequence classifier", config.family().name()),
                supported: SUPPORTED_CLASSIFIERS,
            });
        }
    };
    Ok(vec![
        ProjectionSpec {
            name: dense.into(),
            in_features: hidden,
            out_features: hidden,
            bias: true,
            activation: Activation::Tanh,
        },
        ProjectionSpec {
            name: out.into(),
            in_features: hidden,
            out_features: labels,
            bias: true,
            activation: Activation::Identity,
        },
    ])
}

fn pack<T: Element>(
    specs: &[ProjectionSpec],
    source: &dyn TensorSource,
) -> Result<(Vec<(Linear, Activation)>, PackedWeights)> {
    let mut p = Packer::<T>::new(source, 0);
    let mut projections = Vec::with_capacity(specs.len());
    for spec in specs {
        let linear = Linear::pack(
            &mut p,
            &spec.name,
            spec.in_features,
            spec.out_features,
            spec.bias,
        )?;
        projections.push((linear, spec.activation));
    }
    Ok((projections, p.finish()))
}

impl Head {
    /// The head of `spec`; `model_head` is the model's `head` component,
    /// which classifiers need.
    pub fn load(
        gpu: &Gpu,
        spec: &ModelSpec,
        model_head: Option<&dyn TensorSource>,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let (specs, modules) = match &spec.labels {
            Some(labels) => (
                classifier_projections(&spec.origin, &spec.config, labels.len())?,
                Vec::new(),
            ),
            None => {
                let mut modules = Vec::new();
                let mut specs = Vec::new();
                for dense in &spec.dense {
                    let path = spec
                        .origin
                        .join(&dense.folder)
                        .join(crate::config::MODULE_WEIGHTS_FILE);
                    modules.push((
                        dense.folder.clone(),
                        SafetensorsBytes::new(path, std::sync::Arc::clone(&dense.weights))?,
                    ));
                    specs.push(ProjectionSpec {
                        name: format!("{}/linear", dense.folder),
                        in_features: dense.in_features,
                        out_features: dense.out_features,
                        bias: dense.bias,
                        activation: dense.activation,
                    });
                }
                (specs, modules)
            }
        };
        let sources = HeadSources {
            model: model_head,
            modules,
        };
        let (projections, packed) = for_dtype(
            dtype,
            || pack::<f32>(&specs, &sources),
            || pack::<half::f16>(&specs, &sources),
        )?;
        let buffer = (!projections.is_empty()).then(|| {
            gpu.check_binding_size("the head's weights", packed.bytes().len() as u64)
                .map(|()| gpu.storage_buffer_with("head", packed.bytes()))
        });
        let buffer = buffer.transpose()?;
        let hidden = spec.config.hidden_size();
        let width = specs
            .iter()
            .map(|s| s.out_features)
            .fold(hidden, usize::max);
        Ok(Self {
            pooling: spec.pooling,
            projections,
            normalize: spec.normalize,
            buffer,
            width,
            dimension: spec.output_dimension(),
        })
    }

    /// Bytes of the head's weights in GPU memory.
    pub fn bytes(&self) -> u64 {
        self.buffer.as_ref().map_or(0, wgpu::Buffer::size)
    }

    /// The widest vector the head makes, which sizes its buffers.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Length of each output.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Records pooling, the projections and, where the model asks for it,
    /// normalisation, from the final token `states`; returns the buffer that
    /// holds the outputs, `[sequences, dimension]`.
    pub fn record<'b>(
        &self,
        cx: &Recorder<'b>,
        plan: &mut DispatchPlan,
        states: &wgpu::Buffer,
        hidden: usize,
    ) -> &'b wgpu::Buffer {
        let batch = cx.batch;
        // Without projections the pooled vectors are the outputs, and the
        // pooling launch normalises them itself.
        let projects = self.buffer.is_some() && !self.projections.is_empty();
        let pool = if self.normalize && !projects {
            crate::kernels::pool::Pool::push_normalized
        } else {
            crate::kernels::pool::Pool::push
        };
        pool(
            &cx.kernels.pool,
            plan,
            batch.sequences,
            batch.seq_len,
            hidden,
            self.pooling,
            states,
            &batch.lengths,
            &batch.pooled,
        );
        if !projects {
            return &batch.pooled;
        }
        let (mut current, mut other) = (&batch.pooled, &batch.projected);
        if let Some(weights) = &self.buffer {
            for (linear, activation) in &self.projections {
                linear.record(
                    cx,
                    plan,
                    batch.sequences,
                    *activation,
                    current,
                    weights,
                    other,
                );
                std::mem::swap(&mut current, &mut other);
            }
        }
        if self.normalize {
            cx.kernels
                .normalize
                .push(plan, batch.sequences, self.dimension, current);
        }
        current
    }
}
