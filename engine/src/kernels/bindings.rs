//! Bind groups and parameter buffers kept from one batch to the next.
//!
//! A batch of the same shape launches the same kernels on the same buffers
//! (activation buffers, layer slots) every time, so its bind groups can be
//! made once. The parameter blocks change with the row count, so each plan of
//! a batch rewrites its own uniform buffer, which keeps its identity and with
//! it the bind groups that name it. wgpu orders a buffer write after the
//! submissions made before it, so rewriting a buffer that an earlier batch
//! read is safe.

use std::collections::HashMap;

use crate::gpu::Gpu;

/// Smallest parameter buffer: room for a few hundred launches, so that
/// batches of different lengths share one buffer, and with it their bind
/// groups, instead of each growth dropping the groups of the smaller ones.
const MIN_UNIFORM_BYTES: u64 = 64 << 10;

/// Beyond this many bind groups the cache starts again, so that groups naming
/// buffers that were since replaced do not keep them alive for long.
const MAX_GROUPS: usize = 4096;

#[derive(PartialEq, Eq, Hash)]
pub(crate) struct BindingKey {
    pub pipeline: wgpu::ComputePipeline,
    pub uniform: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
    pub storage: Vec<wgpu::Buffer>,
}

/// One engine's cache; not shared, since its uniform buffers are rewritten
/// by each batch.
#[derive(Default)]
pub struct BindingCache {
    uniforms: Vec<wgpu::Buffer>,
    next_uniform: usize,
    groups: HashMap<BindingKey, wgpu::BindGroup>,
    created: u64,
}

impl BindingCache {
    /// Starts a batch: its plans take the uniform buffers from the first.
    pub fn begin_batch(&mut self) {
        self.next_uniform = 0;
    }

    /// Forgets everything, for when the buffers it names are replaced.
    pub fn clear(&mut self) {
        self.uniforms.clear();
        self.groups.clear();
        self.next_uniform = 0;
    }

    /// Bind groups made since the engine started.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The next plan's uniform buffer, holding `data`.
    pub(crate) fn uniform_buffer(&mut self, gpu: &Gpu, data: &[u8]) -> wgpu::Buffer {
        let index = self.next_uniform;
        self.next_uniform += 1;
        let needed = (data.len() as u64).max(16).next_multiple_of(256);
        let fits = self.uniforms.get(index).is_some_and(|b| b.size() >= needed);
        if !fits {
            let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: needed.next_power_of_two().max(MIN_UNIFORM_BYTES),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            if let Some(old) = self.uniforms.get(index) {
                let old = old.clone();
                self.groups.retain(|key, _| key.uniform != old);
                self.uniforms[index] = buffer;
            } else {
                self.uniforms.push(buffer);
            }
        }
        let buffer = self.uniforms[index].clone();
        gpu.queue.write_buffer(&buffer, 0, data);
        buffer
    }

    /// The bind group for `key`, made by `make` the first time.
    pub(crate) fn group(
        &mut self,
        key: BindingKey,
        make: impl FnOnce(&BindingKey) -> wgpu::BindGroup,
    ) -> wgpu::BindGroup {
        if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            self.groups.clear();
        }
        if let Some(group) = self.groups.get(&key) {
            return group.clone();
        }
        let group = make(&key);
        self.created += 1;
        self.groups.insert(key, group.clone());
        group
    }
}
