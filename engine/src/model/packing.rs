//! Host-side packing: a module's tensors, read by checkpoint name, laid end to
//! end in the buffer its kernels read, in the engine's weight dtype.

use crate::dtype::WeightDtype;
use crate::error::Result;
use crate::weights::TensorSource;

/// An element type that weights are packed in.
pub trait Element: bytemuck::Pod + Default {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>>;
    fn wrap(data: Vec<Self>) -> PackedWeights;
}

impl Element for f32 {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>> {
        weights.tensor(name, shape)
    }
    fn wrap(data: Vec<Self>) -> PackedWeights {
        PackedWeights::F32(data)
    }
}

impl Element for half::f16 {
    fn read(weights: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<Self>> {
        weights.tensor_f16(name, shape)
    }
    fn wrap(data: Vec<Self>) -> PackedWeights {
        PackedWeights::F16(data)
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

/// Lays tensors end to end in one buffer, each starting on a 4-element
/// boundary so that kernels may read them as vec4 (16 bytes of f32, 8 of f16).
/// It moves elements as they are, so f16 words are never widened.
pub struct Packer<'a, T> {
    pub(crate) data: Vec<T>,
    source: &'a dyn TensorSource,
}

impl<'a, T: Element> Packer<'a, T> {
    pub fn new(source: &'a dyn TensorSource, capacity: usize) -> Self {
        Self {
            data: Vec::with_capacity(capacity),
            source,
        }
    }

    /// Reads one tensor of the checkpoint.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<T>> {
        T::read(self.source, name, shape)
    }

    /// Whether the checkpoint has the tensor.
    pub fn has(&self, name: &str) -> bool {
        self.source.contains(name)
    }

    pub fn offset(&mut self) -> u32 {
        let aligned = self.data.len().next_multiple_of(4);
        self.data.resize(aligned, T::default());
        aligned as u32
    }

    pub fn put(&mut self, values: &[T]) -> u32 {
        let offset = self.offset();
        self.data.extend_from_slice(values);
        offset
    }

    /// Reads a tensor and appends it as it is.
    pub fn put_tensor(&mut self, name: &str, shape: &[usize]) -> Result<u32> {
        let values = self.read(name, shape)?;
        Ok(self.put(&values))
    }

    /// Appends `count` zeros: the bias of a linear layer that has none.
    pub fn put_zeros(&mut self, count: usize) -> u32 {
        let offset = self.offset();
        self.data.resize(self.data.len() + count, T::default());
        offset
    }

    /// Appends `weight` ([out, in], as checkpoints store linear layers)
    /// transposed to [in, out], which is the B operand the matmul reads.
    /// The copy walks square blocks so that both sides stay in cache: a
    /// plain row-by-row transpose of a 1536x384 weight misses on every write,
    /// and packing runs on the fetch path of streamed layers.
    pub fn put_transposed(&mut self, weight: &[T], out_features: usize, in_features: usize) -> u32 {
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

    /// Ends the buffer on a 4-element boundary and hands it over.
    pub fn finish(mut self) -> PackedWeights {
        self.offset();
        T::wrap(self.data)
    }
}

/// A tensor source of zeros of the asked shape: packing it gives a module's
/// layout without reading any weights.
pub struct Zeros;

impl TensorSource for Zeros {
    fn tensor(&self, _name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(vec![0.0; shape.iter().product()])
    }
    fn tensor_f16(&self, _name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        Ok(vec![half::f16::ZERO; shape.iter().product()])
    }
}

/// Runs `pack`, generic over the element type, for `dtype`.
pub fn for_dtype<L>(
    dtype: WeightDtype,
    pack_f32: impl FnOnce() -> Result<(L, PackedWeights)>,
    pack_f16: impl FnOnce() -> Result<(L, PackedWeights)>,
) -> Result<(L, PackedWeights)> {
    match dtype {
        WeightDtype::F32 => pack_f32(),
        WeightDtype::F16 => pack_f16(),
    }
}

#[cfg(test)]
mod tests {
    use super::{Packer, Zeros};

    #[test]
    fn blocked_transpose_matches_the_definition() {
        // Sizes that are not multiples of the block, after an unaligned tensor.
        for (out_features, in_features) in [(37, 70), (1, 5), (64, 33), (3, 1)] {
            let weight: Vec<f32> = (0..out_features * in_features)
                .map(|v| v as f32 * 0.5 - 7.0)
                .collect();
            let mut packer = Packer::<f32>::new(&Zeros, 0);
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
