//! What a server offers: the model's small files and its weights grouped
//! into components, each with the hashes a client checks.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Components are hashed in chunks of this many bytes (the last chunk may be
/// shorter), so that a client finds damage within one chunk and resumes from
/// the chunk before it instead of from the start.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// A blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Compares in constant time (blake3's `Hash` equality is constant-time).
    pub fn matches(&self, hash: &blake3::Hash) -> bool {
        blake3::Hash::from_bytes(self.0) == *hash
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Element type of a tensor, as named in safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    pub fn size_bytes(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }
}

/// One tensor inside a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Name without any `bert.` prefix, e.g. `encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Where the tensor starts inside its component's bytes.
    pub offset: u64,
    pub byte_len: u64,
    pub hash: Digest,
}

impl TensorEntry {
    pub fn byte_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.byte_len
    }
}

/// A unit of fetching: `embeddings`, `encoder.layer.N` or `pooler`. Its bytes
/// are its tensors' raw little-endian bytes, concatenated in `tensors` order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub byte_len: u64,
    /// blake3 of all the component's bytes.
    pub hash: Digest,
    /// blake3 of each `chunk_size` slice of the bytes, in order.
    pub chunk_hashes: Vec<Digest>,
    pub tensors: Vec<TensorEntry>,
}

impl Component {
    /// Describes `bytes` as a component made of `tensors` (whose offsets and
    /// lengths must tile `bytes`), hashing it the way clients check it.
    pub fn describe(
        name: impl Into<String>,
        tensors: Vec<TensorEntry>,
        bytes: &[u8],
        chunk_size: u64,
    ) -> Self {
        Component {
            name: name.into(),
            byte_len: bytes.len() as u64,
            hash: Digest::of(bytes),
            chunk_hashes: chunk_digests(bytes, chunk_size),
            tensors,
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|tensor| tensor.name == name)
    }
}

/// blake3 of each `chunk_size` slice of `bytes`.
pub fn chunk_digests(bytes: &[u8], chunk_size: u64) -> Vec<Digest> {
    let chunk_size = usize::try_from(chunk_size.max(1)).unwrap_or(usize::MAX);
    bytes.chunks(chunk_size).map(Digest::of).collect()
}

/// Everything a client needs to know before it fetches weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model folder's name, e.g. `all-MiniLM-L6-v2`.
    pub model_id: String,
    /// Hex blake3 over the files and component hashes: two servers with the
    /// same revision serve the same bytes, which is what makes fail-over safe.
    pub revision: String,
    /// The model folder's small files (`config.json`, `tokenizer.json`,
    /// `modules.json`, `1_Pooling/config.json`, ...) by relative path with `/`.
    pub files: BTreeMap<String, Vec<u8>>,
    pub chunk_size: u64,
    /// `embeddings`, then `encoder.layer.0..N`, then `pooler` when present.
    pub components: Vec<Component>,
}

impl Manifest {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components
            .iter()
            .find(|component| component.name == name)
    }

    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    /// Finds a tensor by its (prefix-free) name and the component holding it.
    pub fn tensor(&self, name: &str) -> Option<(&Component, &TensorEntry)> {
        self.components
            .iter()
            .find_map(|component| component.tensor(name).map(|tensor| (component, tensor)))
    }

    /// Number of `encoder.layer.N` components.
    pub fn num_layers(&self) -> usize {
        self.components
            .iter()
            .filter(|component| component.name.starts_with("encoder.layer."))
            .count()
    }

    /// Bytes of all components together.
    pub fn total_bytes(&self) -> u64 {
        self.components
            .iter()
            .map(|component| component.byte_len)
            .sum()
    }

    /// The revision that the files and components hash to.
    pub fn compute_revision(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"surf-manifest-revision-v1");
        hasher.update(&self.chunk_size.to_le_bytes());
        for (path, contents) in &self.files {
            hash_field(&mut hasher, path.as_bytes());
            hasher.update(blake3::hash(contents).as_bytes());
        }
        for component in &self.components {
            hash_field(&mut hasher, component.name.as_bytes());
            hasher.update(&component.hash.0);
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Checks what a client cannot afford to take on trust: that the chunk
    /// hashes cover each component exactly, that tensors lie inside their
    /// component, and that the revision matches the contents.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |detail: String| Err(Error::InvalidManifest { detail });
        if self.chunk_size == 0 {
            return invalid("chunk size is zero".into());
        }
        for component in &self.components {
            let expected_chunks = component.byte_len.div_ceil(self.chunk_size);
            if component.chunk_hashes.len() as u64 != expected_chunks {
                return invalid(format!(
                    "{} has {} chunk hashes for {} bytes",
                    component.name,
                    component.chunk_hashes.len(),
                    component.byte_len
                ));
            }
            for tensor in &component.tensors {
                let end = tensor.offset.checked_add(tensor.byte_len);
                if end.is_none_or(|end| end > component.byte_len) {
                    return invalid(format!(
                        "tensor {} lies outside component {}",
                        tensor.name, component.name
                    ));
                }
            }
        }
        let computed = self.compute_revision();
        if computed != self.revision {
            return invalid(format!(
                "revision {} does not match its contents ({computed})",
                self.revision
            ));
        }
        Ok(())
    }
}

fn hash_field(hasher: &mut blake3::Hasher, field: &[u8]) {
    hasher.update(&(field.len() as u64).to_le_bytes());
    hasher.update(field);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_manifest() -> Manifest {
        let bytes: Vec<u8> = (0..10u8).collect();
        let tensor = TensorEntry {
            name: "pooler.dense.bias".into(),
            dtype: Dtype::U8,
            shape: vec![10],
            offset: 0,
            byte_len: 10,
            hash: Digest::of(&bytes),
        };
        let mut manifest = Manifest {
            model_id: "tiny".into(),
            revision: String::new(),
            files: BTreeMap::from([("config.json".to_string(), b"{}".to_vec())]),
            chunk_size: 4,
            components: vec![Component::describe("pooler", vec![tensor], &bytes, 4)],
        };
        manifest.revision = manifest.compute_revision();
        manifest
    }

    #[test]
    fn chunk_hashes_cover_the_bytes_with_a_short_last_chunk() {
        let manifest = sample_manifest();
        let component = &manifest.components[0];
        assert_eq!(component.chunk_hashes.len(), 3);
        assert_eq!(component.chunk_hashes[2], Digest::of(&[8, 9]));
        manifest
            .validate()
            .expect("a freshly built manifest is valid");
    }

    #[test]
    fn revision_changes_when_a_file_changes() {
        let mut manifest = sample_manifest();
        let before = manifest.revision.clone();
        manifest
            .files
            .insert("config.json".into(), b"{\"a\":1}".to_vec());
        assert_ne!(manifest.compute_revision(), before);
        assert!(matches!(
            manifest.validate(),
            Err(Error::InvalidManifest { .. })
        ));
    }

    #[test]
    fn tensor_outside_its_component_is_rejected() {
        let mut manifest = sample_manifest();
        manifest.components[0].tensors[0].byte_len = 11;
        assert!(matches!(
            manifest.validate(),
            Err(Error::InvalidManifest { .. })
        ));
    }
}
