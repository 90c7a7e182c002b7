//! Reading tensors out of safetensors bytes, converting f16 and bf16 to f32.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Where named tensors come from. The model code asks for each tensor by its
/// checkpoint name and the shape it expects; the source converts it to f32.
pub trait TensorSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// A memory-mapped `model.safetensors`.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Some checkpoints name every tensor `bert.<name>`.
    prefix: &'static str,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the map is read-only and the file is not written by this process.
        // A concurrent writer elsewhere could change the bytes under us; the weights
        // are then garbage, but no Rust invariant depends on their values.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let parsed = parse(path, &map)?;
        let prefix = if parsed.names().iter().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        drop(parsed);
        Ok(Self {
            path: path.into(),
            map,
            prefix,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes stored for the tensors of one component (`embeddings`,
    /// `encoder.layer.N`, `pooler`).
    pub fn component_bytes(&self, component: &str) -> Result<u64> {
        let tensors = parse(&self.path, &self.map)?;
        let prefix = format!("{}{component}.", self.prefix);
        Ok(tensors
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, view)| view.data().len() as u64)
            .sum())
    }

    /// Checks that every tensor in `expected` is present with that shape and a
    /// supported dtype, without reading any weights.
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let tensors = parse(&self.path, &self.map)?;
        for (name, shape) in expected {
            let full = format!("{}{name}", self.prefix);
            let view = tensors.tensor(&full).map_err(|_| Error::MissingTensor {
                path: self.path.clone(),
                tensor: full.clone(),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(Error::WrongShape {
                    path: self.path.clone(),
                    tensor: full,
                    expected: shape.clone(),
                    actual: view.shape().to_vec(),
                });
            }
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: full,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
        }
        Ok(())
    }
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::bad_model(path, format!("not a valid safetensors file ({e})")))
}

impl TensorSource for SafetensorsFile {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let tensors = parse(&self.path, &self.map)?;
        let full = format!("{}{name}", self.prefix);
        let view = tensors.tensor(&full).map_err(|_| Error::MissingTensor {
            path: self.path.clone(),
            tensor: full.clone(),
        })?;
        decode(
            &self.path,
            &full,
            view.dtype(),
            view.shape(),
            view.data(),
            shape,
        )
    }
}

/// Checks `actual_shape` against `shape` and converts `data` to f32.
pub fn decode(
    path: &Path,
    name: &str,
    dtype: Dtype,
    actual_shape: &[usize],
    data: &[u8],
    shape: &[usize],
) -> Result<Vec<f32>> {
    if actual_shape != shape {
        return Err(Error::WrongShape {
            path: path.into(),
            tensor: name.into(),
            expected: shape.to_vec(),
            actual: actual_shape.to_vec(),
        });
    }
    let count: usize = shape.iter().product();
    let element_size = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(Error::UnsupportedDtype {
                path: path.into(),
                tensor: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    };
    if data.len() != count * element_size {
        return Err(Error::bad_model(
            path,
            format!(
                "tensor `{name}` holds {} bytes, its shape needs {}",
                data.len(),
                count * element_size
            ),
        ));
    }
    // The mapped bytes need not be aligned for f32, so decode element by element.
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    Ok(values)
}
