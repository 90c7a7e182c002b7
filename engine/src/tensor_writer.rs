//! Writes a safetensors file one tensor at a time, each produced in blocks,
//! so that writing a model of any size holds one block in memory: the
//! header comes first (every name, dtype, shape and offset is known from the
//! shapes alone), then each tensor's bytes as they are made.

use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};

/// Elements produced and encoded per block.
pub const BLOCK_ELEMENTS: usize = 1 << 16;

/// Bytes one element takes in `dtype` (f32, f16 or bf16).
fn element_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    }
}

/// The JSON header of a file holding `tensors` in this order, all in
/// `dtype`, padded with spaces to a multiple of 8 bytes as safetensors
/// aligns its data.
pub fn header(tensors: &[(String, Vec<usize>)], dtype: Dtype) -> Result<Vec<u8>> {
    let mut entries = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * element_bytes(dtype);
        entries.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&entries)
        .map_err(|e| Error::WeightSource(format!("the safetensors header: {e}")))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    Ok(header)
}

/// Writes `path`: `tensors` in order, all in `dtype`, each filled block by
/// block by `fill(tensor index, name, block)`, which is called in file order
/// with blocks of at most [`BLOCK_ELEMENTS`] values.
pub fn write_streaming(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: Dtype,
    mut fill: impl FnMut(usize, &str, &mut [f32]),
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let header = header(tensors, dtype)?;
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    let mut values = vec![0f32; BLOCK_ELEMENTS];
    let mut encoded = Vec::with_capacity(BLOCK_ELEMENTS * element_bytes(dtype));
    for (index, (name, shape)) in tensors.iter().enumerate() {
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let block = &mut values[..left.min(BLOCK_ELEMENTS)];
            fill(index, name, block);
            encoded.clear();
            encode_into(block, dtype, &mut encoded);
            out.write_all(&encoded).map_err(io)?;
            left -= block.len();
        }
    }
    out.flush().map_err(io)?;
    Ok(())
}

/// Appends `values` as little-endian `dtype` elements.
pub fn encode_into(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F16 => {
            for value in values {
                out.extend_from_slice(&half::f16::from_f32(*value).to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for value in values {
                out.extend_from_slice(&half::bf16::from_f32(*value).to_le_bytes());
            }
        }
        _ => {
            for value in values {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_file_reads_back_with_every_value_in_place() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("model.safetensors");
        // One tensor spanning several blocks, one of 3 elements, one of 1.
        let tensors = vec![
            ("b.large".to_string(), vec![3, BLOCK_ELEMENTS / 2 + 5]),
            ("a.odd".to_string(), vec![3]),
            ("c.one".to_string(), vec![1, 1]),
        ];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let mut counter = 0f32;
            write_streaming(&path, &tensors, dtype, |index, _, block| {
                for value in block.iter_mut() {
                    *value = index as f32 * 1000.0 + (counter % 256.0);
                    counter += 1.0;
                }
            })
            .expect("written");
            let bytes = std::fs::read(&path).expect("read back");
            let file = safetensors::SafeTensors::deserialize(&bytes).expect("a valid file");
            let mut counter = 0f32;
            for (index, (name, shape)) in tensors.iter().enumerate() {
                let view = file.tensor(name).expect("present");
                assert_eq!(view.shape(), shape.as_slice());
                assert_eq!(view.dtype(), dtype);
                let read: Vec<f32> = match dtype {
                    Dtype::F32 => view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    Dtype::F16 => view
                        .data()
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    _ => view
                        .data()
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                };
                for value in read {
                    // Values up to 2255 are exact in f16; bf16 keeps 8 bits.
                    let expected = index as f32 * 1000.0 + (counter % 256.0);
                    let tolerance = if dtype == Dtype::BF16 { 8.0 } else { 0.0 };
                    assert!(
                        (value - expected).abs() <= tolerance,
                        "{name} ({dtype:?}): {value} for {expected}"
                    );
                    counter += 1.0;
                }
            }
        }
    }
}
