//! One launcher per WGSL kernel. Each owns its pipeline and bind-group layout,
//! built once; `DispatchPlan` records many launches into one compute pass.

pub mod attention;
pub mod autotune;
pub mod bindings;
pub mod choice;
pub mod embed;
pub mod family;
pub mod fma_peak;
pub mod gate;
pub mod layernorm;
pub mod matmul;
pub mod matmul_norm;
pub mod normalize;
pub mod pool;
pub mod rotary;
pub mod selection;
pub mod sources;
pub mod tuning_cache;

use crate::gpu::Gpu;
use bindings::{BindingCache, BindingKey};
use family::KernelFamily;

/// One pipeline per `(variant, source)` of the subgroup kernels, or none on
/// adapters that cannot run the `subgroup8` family.
pub fn subgroup_kernels(
    gpu: &Gpu,
    label: &'static str,
    sources: &[(u32, &str)],
    storage: &[Access],
) -> Vec<(u32, LazyKernel)> {
    if KernelFamily::Subgroup8.unsupported_reason(gpu).is_some() {
        return Vec::new();
    }
    sources
        .iter()
        .map(|&(variant, source)| (variant, LazyKernel::new(gpu, label, source, storage)))
        .collect()
}

/// How a kernel uses one storage binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A compiled compute pipeline whose binding 0 is a uniform parameter block and
/// whose bindings 1.. are storage buffers.
#[derive(Clone)]
pub struct Kernel {
    pub(crate) label: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    storage_count: usize,
}

impl Kernel {
    pub fn new(gpu: &Gpu, label: &'static str, source: &str, storage: &[Access]) -> Self {
        let device = &gpu.device;
        // Checked modules: wgpu's bounds checks and loop bounding measured no
        // slower on llvmpipe than `create_shader_module_trusted` for the matmul,
        // the only kernel where it could matter, so nothing here needs unsafe.
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, access) in storage.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: gpu.pipeline_cache(),
        });
        Self {
            label,
            pipeline,
            layout,
            storage_count: storage.len(),
        }
    }
}

/// A kernel compiled when first launched. An engine's launchers hold every
/// family's kernels, but an adapter runs the few its measured choices name;
/// compiling the others at start-up cost seconds on software adapters.
pub struct LazyKernel {
    gpu: Gpu,
    label: &'static str,
    source: String,
    storage: Vec<Access>,
    compiled: std::sync::OnceLock<Kernel>,
}

impl LazyKernel {
    pub fn new(gpu: &Gpu, label: &'static str, source: &str, storage: &[Access]) -> Self {
        Self {
            gpu: gpu.clone(),
            label,
            source: source.to_string(),
            storage: storage.to_vec(),
            compiled: std::sync::OnceLock::new(),
        }
    }

    /// The compiled kernel, compiling it on the first call.
    pub fn get(&self) -> &Kernel {
        self.compiled
            .get_or_init(|| Kernel::new(&self.gpu, self.label, &self.source, &self.storage))
    }
}

struct PendingDispatch {
    kernel: Kernel,
    uniform_offset: u64,
    uniform_size: u64,
    storage: Vec<wgpu::Buffer>,
    workgroups: [u32; 3],
}

/// Launches collected for one command encoder: their parameter blocks share one
/// uniform buffer, and all of them run in a single compute pass.
pub struct DispatchPlan {
    uniforms: Vec<u8>,
    alignment: usize,
    dispatches: Vec<PendingDispatch>,
}

impl DispatchPlan {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            uniforms: Vec::new(),
            alignment: gpu.limits.min_uniform_buffer_offset_alignment as usize,
            dispatches: Vec::new(),
        }
    }

    pub fn push<P: bytemuck::Pod>(
        &mut self,
        kernel: &Kernel,
        params: &P,
        storage: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) {
        assert_eq!(
            storage.len(),
            kernel.storage_count,
            "kernel {} takes {} storage buffers",
            kernel.label,
            kernel.storage_count
        );
        let offset = self.uniforms.len().next_multiple_of(self.alignment);
        self.uniforms.resize(offset, 0);
        self.uniforms.extend_from_slice(bytemuck::bytes_of(params));
        self.dispatches.push(PendingDispatch {
            kernel: kernel.clone(),
            uniform_offset: offset as u64,
            uniform_size: std::mem::size_of::<P>() as u64,
            storage: storage.iter().map(|b| (*b).clone()).collect(),
            workgroups,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }

    /// Records every launch, in order, into one compute pass of `encoder`.
    pub fn record(self, gpu: &Gpu, encoder: &mut wgpu::CommandEncoder) {
        self.record_with(gpu, encoder, None, None);
    }

    /// Like `record`, with the GPU writing its clock at the start and end of
    /// the pass to queries 0 and 1 of `timestamps` (`TIMESTAMP_QUERY`).
    pub fn record_timed(
        self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamps: &wgpu::QuerySet,
    ) {
        self.record_with(gpu, encoder, None, Some(timestamps));
    }

    /// Like `record`, taking the uniform buffer and bind groups from `cache`
    /// where an earlier batch made them.
    pub fn record_cached(
        self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut BindingCache,
    ) {
        self.record_with(gpu, encoder, Some(cache), None);
    }

    fn record_with(
        self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        mut cache: Option<&mut BindingCache>,
        timestamps: Option<&wgpu::QuerySet>,
    ) {
        if self.dispatches.is_empty() {
            return;
        }
        let uniforms = match cache.as_deref_mut() {
            Some(cache) => cache.uniform_buffer(gpu, &self.uniforms),
            None => gpu.uniform_buffer("params", &self.uniforms),
        };
        let make = |key: &BindingKey, label: &str, layout: &wgpu::BindGroupLayout| {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &key.uniform,
                    offset: key.offset,
                    size: wgpu::BufferSize::new(key.size),
                }),
            }];
            for (i, buffer) in key.storage.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: buffer.as_entire_binding(),
                });
            }
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries: &entries,
            })
        };
        let mut bind_groups = Vec::with_capacity(self.dispatches.len());
        for d in &self.dispatches {
            let key = BindingKey {
                pipeline: d.kernel.pipeline.clone(),
                uniform: uniforms.clone(),
                offset: d.uniform_offset,
                size: d.uniform_size,
                storage: d.storage.clone(),
            };
            let group = match cache.as_deref_mut() {
                Some(cache) => cache.group(key, |key| make(key, d.kernel.label, &d.kernel.layout)),
                None => make(&key, d.kernel.label, &d.kernel.layout),
            };
            bind_groups.push(group);
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("surf"),
            timestamp_writes: timestamps.map(|query_set| wgpu::ComputePassTimestampWrites {
                query_set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        });
        for (d, bind_group) in self.dispatches.iter().zip(&bind_groups) {
            pass.set_pipeline(&d.kernel.pipeline);
            pass.set_bind_group(0, bind_group, &[]);
            let [x, y, z] = d.workgroups;
            pass.dispatch_workgroups(x, y, z);
        }
    }

    /// Records and submits in a fresh encoder, with `cache`'s buffers and
    /// bind groups.
    pub fn submit_cached(self, gpu: &Gpu, cache: &mut BindingCache) -> wgpu::SubmissionIndex {
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("surf"),
            });
        self.record_cached(gpu, &mut encoder, cache);
        gpu.queue.submit([encoder.finish()])
    }

    /// Records and submits in a fresh encoder.
    pub fn submit(self, gpu: &Gpu) -> wgpu::SubmissionIndex {
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("surf"),
            });
        self.record(gpu, &mut encoder);
        gpu.queue.submit([encoder.finish()])
    }
}

/// Spreads `groups` workgroups over x and y so that neither exceeds the
/// per-dimension limit; returns the grid and its x extent.
pub fn grid_2d(gpu: &Gpu, groups: u32) -> ([u32; 3], u32) {
    let max = gpu.limits.max_compute_workgroups_per_dimension.max(1);
    if groups <= max {
        ([groups.max(1), 1, 1], groups.max(1))
    } else {
        let y = groups.div_ceil(max);
        let x = groups.div_ceil(y);
        ([x, y, 1], x)
    }
}
