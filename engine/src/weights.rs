//! Reading tensors out of safetensors bytes, as f32 or as f16: f16 stored
//! tensors are copied word for word into f16, bf16 ones are converted
//! through f32 (never reinterpreted), f32 ones rounded to nearest.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Where named tensors come from. The model code asks for each tensor by its
/// checkpoint name and the shape it expects, in the element type it packs.
pub trait TensorSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>>;

    /// Whether the tensor is there, for checkpoints that name one tensor in
    /// two ways (T5's `shared.weight` or `encoder.embed_tokens.weight`).
    fn contains(&self, _name: &str) -> bool {
        true
    }

    /// Appends rows `ids` of the 2-D tensor `name` of `shape`, as f32: the
    /// word embeddings a batch uses, without converting the whole table.
    fn gather_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let table = self.tensor(name, shape)?;
        let width = shape.get(1).copied().unwrap_or(0);
        for &id in ids {
            let start = id as usize * width;
            let row = table.get(start..start + width).ok_or_else(|| {
                Error::InvalidInput(format!("row {id} is outside the table `{name}`"))
            })?;
            out.extend_from_slice(row);
        }
        Ok(())
    }

    /// Bytes this source received after it was made: rows of a table read
    /// on demand from a weight server. Sources that hold all their bytes
    /// from the start report 0.
    fn bytes_received(&self) -> u64 {
        0
    }
}

/// A memory-mapped `model.safetensors`.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// The prefix of the base model's tensors in checkpoints saved with a
    /// head (`bert.`, `roberta.`): tensors are asked for without it.
    prefix: String,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the map is read-only and the file is not written by this process.
        // A concurrent writer elsewhere could change the bytes under us; the weights
        // are then garbage, but no Rust invariant depends on their values.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        parse(path, &map)?;
        Ok(Self {
            path: path.into(),
            map,
            prefix: String::new(),
        })
    }

    /// Reads the base model's tensors under the first of `prefixes` that
    /// `anchor` (a tensor every checkpoint of the family has) carries, if any.
    pub fn with_prefix_of(mut self, prefixes: &[&str], anchor: &str) -> Result<Self> {
        let parsed = parse(&self.path, &self.map)?;
        let names = parsed.names();
        if !names.contains(&anchor)
            && let Some(prefix) = prefixes
                .iter()
                .find(|p| names.iter().any(|n| **n == format!("{p}{anchor}")))
        {
            self.prefix = (*prefix).to_string();
        }
        Ok(self)
    }

    /// The name `name` has in the file: with the base model's prefix when
    /// the file has it so, else as it is (heads such as `classifier.*` sit
    /// beside the prefixed base model).
    fn stored_name(&self, tensors: &SafeTensors<'_>, name: &str) -> String {
        let prefixed = format!("{}{name}", self.prefix);
        if self.prefix.is_empty() || tensors.tensor(&prefixed).is_ok() {
            prefixed
        } else {
            name.to_string()
        }
    }

    /// Every tensor's name without the base model's prefix, and its bytes.
    pub fn tensor_sizes(&self) -> Result<Vec<(String, u64)>> {
        let tensors = parse(&self.path, &self.map)?;
        Ok(tensors
            .iter()
            .map(|(name, view)| {
                let canonical = name.strip_prefix(self.prefix.as_str()).unwrap_or(name);
                (canonical.to_string(), view.data().len() as u64)
            })
            .collect())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that every tensor in `expected` is present with that shape and a
    /// supported dtype, without reading any weights.
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let tensors = parse(&self.path, &self.map)?;
        for (name, shape) in expected {
            let full = self.stored_name(&tensors, name);
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

impl SafetensorsFile {
    fn stored<T>(
        &self,
        name: &str,
        read: impl FnOnce(&Path, &str, Dtype, &[usize], &[u8]) -> Result<T>,
    ) -> Result<T> {
        let tensors = parse(&self.path, &self.map)?;
        let full = self.stored_name(&tensors, name);
        let view = tensors.tensor(&full).map_err(|_| Error::MissingTensor {
            path: self.path.clone(),
            tensor: full.clone(),
        })?;
        read(&self.path, &full, view.dtype(), view.shape(), view.data())
    }
}

impl TensorSource for SafetensorsFile {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.stored(name, |path, full, dtype, actual, data| {
            decode(path, full, dtype, actual, data, shape)
        })
    }

    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.stored(name, |path, full, dtype, actual, data| {
            decode_f16(path, full, dtype, actual, data, shape)
        })
    }

    fn contains(&self, name: &str) -> bool {
        parse(&self.path, &self.map)
            .is_ok_and(|tensors| tensors.tensor(&self.stored_name(&tensors, name)).is_ok())
    }

    fn gather_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.stored(name, |path, full, dtype, actual, data| {
            decode_rows(path, full, dtype, actual, data, shape, ids, out)
        })
    }
}

/// Checks a stored 2-D table against `shape` and appends its rows `ids` as f32.
#[allow(clippy::too_many_arguments)]
pub fn decode_rows(
    path: &Path,
    name: &str,
    dtype: Dtype,
    actual_shape: &[usize],
    data: &[u8],
    shape: &[usize],
    ids: &[u32],
    out: &mut Vec<f32>,
) -> Result<()> {
    check_stored(path, name, dtype, actual_shape, data, shape)?;
    let (rows, width) = match shape {
        [rows, width] => (*rows, *width),
        _ => return Err(Error::bad_model(path, format!("`{name}` is not a table"))),
    };
    let element = if dtype == Dtype::F32 { 4 } else { 2 };
    out.reserve(ids.len() * width);
    for &id in ids {
        if id as usize >= rows {
            return Err(Error::InvalidInput(format!(
                "token id {id} is outside the {rows} rows of `{name}`"
            )));
        }
        let start = id as usize * width * element;
        let row = &data[start..start + width * element];
        match dtype {
            Dtype::F32 => out.extend(
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Dtype::F16 => out.extend(
                row.chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            _ => out.extend(
                row.chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
    }
    Ok(())
}

/// A small safetensors file held in memory (a Dense module's weights).
pub struct SafetensorsBytes {
    path: PathBuf,
    bytes: std::sync::Arc<Vec<u8>>,
}

impl SafetensorsBytes {
    /// Checks the header of `bytes`, named `path` in errors.
    pub fn new(path: PathBuf, bytes: std::sync::Arc<Vec<u8>>) -> Result<Self> {
        parse(&path, &bytes)?;
        Ok(Self { path, bytes })
    }

    fn stored<T>(
        &self,
        name: &str,
        read: impl FnOnce(&Path, &str, Dtype, &[usize], &[u8]) -> Result<T>,
    ) -> Result<T> {
        let tensors = parse(&self.path, &self.bytes)?;
        let view = tensors.tensor(name).map_err(|_| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })?;
        read(&self.path, name, view.dtype(), view.shape(), view.data())
    }
}

impl TensorSource for SafetensorsBytes {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.stored(name, |path, name, dtype, actual, data| {
            decode(path, name, dtype, actual, data, shape)
        })
    }

    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.stored(name, |path, name, dtype, actual, data| {
            decode_f16(path, name, dtype, actual, data, shape)
        })
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
    check_stored(path, name, dtype, actual_shape, data, shape)?;
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

/// Checks `actual_shape` against `shape` and converts `data` to f16: f16
/// words are taken as they are, without a round trip through f32.
pub fn decode_f16(
    path: &Path,
    name: &str,
    dtype: Dtype,
    actual_shape: &[usize],
    data: &[u8],
    shape: &[usize],
) -> Result<Vec<half::f16>> {
    check_stored(path, name, dtype, actual_shape, data, shape)?;
    let values = match dtype {
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        // bf16 keeps f32's exponent range: through f32, values beyond f16's
        // range become infinities instead of reinterpreted garbage.
        _ => data
            .chunks_exact(2)
            .map(|b| half::f16::from_f32(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()))
            .collect(),
    };
    Ok(values)
}

/// Checks a stored tensor's shape, dtype and byte length against what the
/// model expects.
fn check_stored(
    path: &Path,
    name: &str,
    dtype: Dtype,
    actual_shape: &[usize],
    data: &[u8],
    shape: &[usize],
) -> Result<()> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use half::{bf16, f16};
    use safetensors::Dtype;

    use super::decode_f16;

    fn decode(dtype: Dtype, data: &[u8]) -> Vec<f16> {
        let count = data.len() / if dtype == Dtype::F32 { 4 } else { 2 };
        decode_f16(Path::new("t"), "x", dtype, &[count], data, &[count]).expect("decodes")
    }

    #[test]
    fn f16_words_pass_through_and_other_floats_round_to_nearest() {
        // Every f16 bit pattern, NaNs included, comes out as the same word.
        let words: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let out = decode(Dtype::F16, &bytes);
        assert!(out.iter().zip(&words).all(|(v, &w)| v.to_bits() == w));

        let values = [0.1f32, -3.75, 65504.0, 1.0e-6, 70000.0, 1.0 / 3.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = decode(Dtype::F32, &bytes);
        for (v, h) in values.iter().zip(&out) {
            assert_eq!(h.to_bits(), f16::from_f32(*v).to_bits(), "{v}");
        }
        assert!(out[4].is_infinite());

        // bf16 1.5 and 2^-10 are exact in f16; reinterpreting their bits would not be.
        let bf: Vec<u8> = [bf16::from_f32(1.5), bf16::from_f32(2f32.powi(-10))]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let out = decode(Dtype::BF16, &bf);
        assert_eq!(out[0].to_f32(), 1.5);
        assert_eq!(out[1].to_f32(), 2f32.powi(-10));
    }
}
