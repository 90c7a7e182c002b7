//! Batches in flight: while the GPU computes one batch, the next is
//! gathered, uploaded, recorded and submitted. Two sets of activation
//! buffers take turns, so the next batch's uploads and launches never wait on
//! buffers the running one still reads, and each turn has a read-back buffer
//! that lives as long as the engine's run state. A batch's submission ends
//! with the copy of its vectors into its read-back buffer, which is then
//! mapped asynchronously; the engine waits for that submission alone, after
//! submitting the next one.

use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::BatchBuffers;

/// The activation buffers of the batch before the current one, and a
/// read-back buffer per turn.
#[derive(Default)]
pub(super) struct TakingTurns {
    /// The other turn's activation buffers, swapped with the run state's
    /// before each batch.
    spare: Option<BatchBuffers>,
    readbacks: [Option<wgpu::Buffer>; 2],
    turn: usize,
}

impl TakingTurns {
    /// Hands `workspace` the buffers of the batch before last, whose
    /// submission the engine has already waited for, and keeps the current
    /// ones for the batch after this.
    pub(super) fn next_batch(&mut self, workspace: &mut Option<BatchBuffers>) {
        std::mem::swap(workspace, &mut self.spare);
        self.turn ^= 1;
    }

    /// This turn's read-back buffer, holding at least `bytes`.
    fn readback(&mut self, gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(4).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        let slot = &mut self.readbacks[self.turn];
        match slot {
            Some(buffer) if buffer.size() >= size => buffer.clone(),
            _ => {
                let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("batch readback"),
                    // Room to grow: batches vary in size.
                    size: size.next_power_of_two(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                *slot = Some(buffer.clone());
                buffer
            }
        }
    }

    /// Copies `bytes` of `outputs` into this turn's read-back buffer at the
    /// end of `encoder`, submits it and starts mapping the copy.
    pub(super) fn submit(
        &mut self,
        gpu: &Gpu,
        mut encoder: wgpu::CommandEncoder,
        outputs: &wgpu::Buffer,
        bytes: u64,
    ) -> PendingVectors {
        let buffer = self.readback(gpu, bytes);
        let copied = bytes.next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        encoder.copy_buffer_to_buffer(outputs, 0, &buffer, 0, copied);
        let submission = gpu.queue.submit([encoder.finish()]);
        let (sender, mapped) = mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, ..copied, move |result| {
            let _ = sender.send(result);
        });
        PendingVectors {
            buffer,
            bytes,
            copied,
            submission,
            mapped,
        }
    }
}

/// One batch's vectors on their way back.
#[must_use = "the read-back buffer stays mapped until `finish` reads it"]
pub(super) struct PendingVectors {
    buffer: wgpu::Buffer,
    bytes: u64,
    /// The mapped range: `bytes` rounded up to the copy alignment.
    copied: u64,
    submission: wgpu::SubmissionIndex,
    mapped: mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl PendingVectors {
    /// Waits for the batch's submission (not for any submitted after it)
    /// and returns its vectors of `dimension` floats.
    pub(super) fn finish(self, gpu: &Gpu, dimension: usize) -> Result<Vec<Vec<f32>>> {
        gpu.wait_for(self.submission)?;
        self.mapped
            .recv()
            .map_err(|_| Error::Gpu("the readback was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping the readback failed: {e}")))?;
        let vectors = {
            let view = self
                .buffer
                .get_mapped_range(..self.copied)
                .map_err(|e| Error::Gpu(format!("reading the readback failed: {e}")))?;
            let floats: &[f32] = bytemuck::cast_slice(&view[..self.bytes as usize]);
            floats
                .chunks_exact(dimension)
                .map(<[f32]>::to_vec)
                .collect()
        };
        self.buffer.unmap();
        gpu.check_errors()?;
        Ok(vectors)
    }
}
