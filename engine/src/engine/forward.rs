//! One batch through the GPU: token upload, recording the layers as the
//! pager makes them resident, and reading the pooled vectors back; and the
//! start-up run that compiles every pipeline.

use super::in_flight::PendingVectors;
use super::{Engine, RunState};
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::kernels::attention::MASKED;
use crate::model::{BatchBuffers, Recorder};
use crate::tokenize::Tokens;

impl Engine {
    fn recorder<'b>(&'b self, batch: &'b BatchBuffers) -> Recorder<'b> {
        Recorder {
            gpu: &self.gpu,
            kernels: &self.kernels,
            batch,
        }
    }

    /// Records the embedding sum.
    fn record_embeddings(
        &self,
        plan: &mut DispatchPlan,
        batch: &BatchBuffers,
        pinned: &wgpu::Buffer,
    ) {
        self.architecture
            .record_embeddings(&self.recorder(batch), plan, pinned);
    }

    /// Records layer `index`, whose packed weights are in `weights`.
    fn record_layer(
        &self,
        plan: &mut DispatchPlan,
        index: usize,
        weights: &wgpu::Buffer,
        batch: &BatchBuffers,
    ) {
        self.architecture
            .record_layer(&self.recorder(batch), plan, index, weights);
    }

    /// Records what follows the last layer and the head; returns the buffer
    /// that holds the outputs.
    fn record_head<'b>(
        &'b self,
        plan: &mut DispatchPlan,
        batch: &'b BatchBuffers,
        pinned: &wgpu::Buffer,
    ) -> &'b wgpu::Buffer {
        let cx = self.recorder(batch);
        let states = self.architecture.record_final(&cx, plan, pinned);
        self.head.record(&cx, plan, states, self.dims.hidden)
    }

    /// Sizes the activation buffers for the batch `members` of `inputs`,
    /// padded to `seq_len`, and writes its tokens and mask.
    fn load_batch(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        members: &[usize],
        seq_len: usize,
    ) -> Result<()> {
        let config = &self.spec.config;
        let sequences = members.len();
        let rows = sequences * seq_len;
        let workspace = &mut state.workspace;
        let fits = workspace
            .as_ref()
            .is_some_and(|w| w.capacity_rows >= rows && w.capacity_sequences >= sequences);
        if !fits {
            let capacity_rows = rows.max(workspace.as_ref().map_or(0, |w| w.capacity_rows));
            let capacity_sequences =
                sequences.max(workspace.as_ref().map_or(0, |w| w.capacity_sequences));
            state.bindings.clear();
            *workspace = Some(BatchBuffers::new(
                &self.gpu,
                &self.dims,
                self.head.width(),
                capacity_rows,
                capacity_sequences,
            ));
        }
        let Some(batch) = workspace.as_mut() else {
            return Err(Error::Gpu("no activation buffers".into()));
        };
        batch.rows = rows;
        batch.sequences = sequences;
        batch.seq_len = seq_len;

        let mut token_rows = vec![0u32; rows * 3];
        let mut word_ids = vec![0u32; rows];
        let mut mask = vec![MASKED; rows];
        let mut lengths = Vec::with_capacity(sequences);
        for (s, &i) in members.iter().enumerate() {
            let t = &inputs[i];
            lengths.push(t.ids.len() as u32);
            for p in 0..seq_len {
                let row = s * seq_len + p;
                let (id, type_id) = match t.ids.get(p) {
                    Some(&id) => {
                        mask[row] = 0.0;
                        (id, t.type_ids[p])
                    }
                    None => (config.pad_token_id(), 0),
                };
                word_ids[row] = id;
                token_rows[row * 3] = id;
                token_rows[row * 3 + 1] = config.position_id(p);
                token_rows[row * 3 + 2] = type_id;
            }
        }
        let mut word_rows = Vec::new();
        let received = self.words.received();
        self.words.gather(&word_ids, &mut word_rows)?;
        state.pager.counters.bytes_fetched += self.words.received() - received;
        let queue = &self.gpu.queue;
        queue.write_buffer(&batch.tokens, 0, bytemuck::cast_slice(&token_rows));
        queue.write_buffer(&batch.word_rows, 0, bytemuck::cast_slice(&word_rows));
        queue.write_buffer(&batch.mask, 0, bytemuck::cast_slice(&mask));
        queue.write_buffer(&batch.lengths, 0, bytemuck::cast_slice(&lengths));
        if let (Some(bias), Some(buffer)) = (&self.relative_bias, &batch.position_bias) {
            let table = bias.for_length(seq_len);
            queue.write_buffer(buffer, 0, bytemuck::cast_slice(&table));
        }
        if let (Some(rotary), Some(buffer)) = (&self.rotary, &batch.rotary) {
            let tables = rotary.for_length(seq_len);
            queue.write_buffer(buffer, 0, bytemuck::cast_slice(&tables));
        }
        Ok(())
    }

    /// Runs every pipeline of the graph once on short pad-token inputs,
    /// against an empty layer slot. Software adapters such as llvmpipe compile a shader
    /// on its first dispatch, not when the pipeline is made; without this the
    /// first request of every engine pays about a second of compilation.
    /// The result is thrown away, and no layer weights are needed.
    pub(super) fn prime_pipelines(&self, state: &mut RunState) -> Result<()> {
        let Some(scratch) = state.pager.empty_slot_buffer() else {
            return Ok(());
        };
        let pinned = state
            .pinned
            .clone()
            .ok_or_else(|| Error::Gpu("the pinned weights are not in GPU memory".into()))?;
        // The matmul picks its tile heights from the row count; these probes
        // reach every one of them.
        let lengths = crate::kernels::matmul::PRIMING_ROWS
            .into_iter()
            .filter(|&rows| rows <= self.spec.max_seq_length);
        for rows in lengths {
            let probe = Tokens {
                ids: vec![self.spec.config.pad_token_id(); rows],
                type_ids: vec![0; rows],
            };
            self.load_batch(state, std::slice::from_ref(&probe), &[0], rows)?;
            let Some(batch) = state.workspace.as_ref() else {
                return Err(Error::Gpu("no activation buffers".into()));
            };
            let mut plan = DispatchPlan::new(&self.gpu);
            self.record_embeddings(&mut plan, batch, &pinned);
            // Layer 1 where there is one: a pre-norm family's later layers
            // run the residual-adding variant of their first norm.
            let layer = 1.min(self.dims.layers - 1);
            self.record_layer(&mut plan, layer, &scratch, batch);
            self.record_head(&mut plan, batch, &pinned);
            plan.submit(&self.gpu);
        }
        self.gpu.wait_idle()?;
        self.gpu.check_errors()
    }

    /// Uploads and records one batch and submits it, ending with the copy
    /// of its vectors into this turn's read-back buffer; the vectors come
    /// back through the returned `PendingVectors` once the batch has run.
    /// The batch runs on the other turn's activation buffers, so that it
    /// is recorded and submitted while the one before it still runs.
    pub(super) fn submit_batch(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        members: &[usize],
        seq_len: usize,
    ) -> Result<PendingVectors> {
        state.turns.next_batch(&mut state.workspace);
        self.load_batch(state, inputs, members, seq_len)?;
        let sequences = members.len();
        let Some(batch) = state.workspace.as_ref() else {
            return Err(Error::Gpu("no activation buffers".into()));
        };
        let Some(pinned) = state.pinned.as_ref() else {
            return Err(Error::Gpu(
                "the pinned weights are not in GPU memory".into(),
            ));
        };

        let pager = &mut state.pager;
        let bindings = &mut state.bindings;
        bindings.begin_batch();
        // With every layer resident the whole batch is one submission; when
        // layers are paged, each layer is submitted on its own so that the GPU
        // computes it while the next one is fetched and uploaded.
        let paging = pager.capacity() < pager.layers();
        let mut plan = DispatchPlan::new(&self.gpu);
        let mut recorded: Vec<usize> = Vec::new();
        self.record_embeddings(&mut plan, batch, pinned);
        // Fetches start before the embeddings are computed, the first layer
        // first, so that the weight stream never waits for the GPU.
        pager.prefetch_from(0);
        pager.begin_pass();
        for layer in 0..pager.layers() {
            pager.prefetch_from(layer);
            if !pager.is_resident(layer) && !plan.is_empty() {
                std::mem::replace(&mut plan, DispatchPlan::new(&self.gpu))
                    .submit_cached(&self.gpu, bindings);
                recorded.clear();
            }
            let weights = pager.acquire(layer, &recorded)?;
            self.record_layer(&mut plan, layer, &weights, batch);
            recorded.push(layer);
            // While the layers ahead are resident, recording goes on into the
            // same submission: a submission per layer only pays where an
            // upload can run beside the compute.
            if paging && pager.window_needs_upload(layer) {
                std::mem::replace(&mut plan, DispatchPlan::new(&self.gpu))
                    .submit_cached(&self.gpu, bindings);
                recorded.clear();
                pager.upload_ready(layer)?;
            }
        }
        pager.end_pass();
        let outputs = self.record_head(&mut plan, batch, pinned);
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("surf"),
            });
        plan.record_cached(&self.gpu, &mut encoder, bindings);
        let bytes = (sequences * self.head.dimension() * 4) as u64;
        Ok(state.turns.submit(&self.gpu, encoder, outputs, bytes))
    }

    /// The vectors of a batch `submit_batch` submitted, in its members'
    /// order, once it has run.
    pub(super) fn finish_batch(
        &self,
        pending: PendingVectors,
        members: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let vectors = pending.finish(&self.gpu, self.head.dimension())?;
        if let Some(position) = vectors
            .iter()
            .position(|v| v.iter().any(|x| !x.is_finite()))
        {
            return Err(Error::Gpu(format!(
                "the embedding of input {} is not finite",
                members[position]
            )));
        }
        Ok(vectors)
    }
}
