//! What a server offers: the model's small files and its weights grouped
//! into components, each with the hashes a client checks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The weights file of a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Components are hashed in chunks of this many bytes (the last chunk may be
/// shorter), so that a client finds damage within one chunk and resumes from
/// the chunk before it instead of from the start.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// Largest chunk a manifest may declare. Chunks are hashed whole, so a
/// larger one would only delay finding damage.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Largest component (and so largest object) a client accepts: the
/// embeddings of a 250k-token vocabulary at width 1024 in f32 take about
/// 1 GiB, and a client reserves a component's bytes before they arrive.
pub const MAX_COMPONENT_BYTES: u64 = 4 << 30;

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
    /// The dtypes a server can be asked to serve its weights in.
    pub const SERVABLE: [Dtype; 2] = [Dtype::F32, Dtype::F16];

    pub fn size_bytes(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// True for the floating-point dtypes: the ones a server converts to
    /// its served weight dtype.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// True for the dtypes in [`Dtype::SERVABLE`].
    pub fn is_servable(self) -> bool {
        Dtype::SERVABLE.contains(&self)
    }

    /// The lowercase name, as in `--dtype f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::U8 => "u8",
            Dtype::I8 => "i8",
            Dtype::I16 => "i16",
            Dtype::I32 => "i32",
            Dtype::I64 => "i64",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of the weight dtypes a server serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown weight dtype {given:?}; expected one of: f32, f16")]
pub struct ParseDtypeError {
    pub given: String,
}

/// Parses the weight dtypes a server can serve (`f32`, `f16`, in any case);
/// every other name, other dtypes included, is refused.
impl FromStr for Dtype {
    type Err = ParseDtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::SERVABLE
            .into_iter()
            .find(|dtype| dtype.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseDtypeError {
                given: s.to_owned(),
            })
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
    /// Saturates instead of overflowing: [`Manifest::validate`] refuses any
    /// tensor whose end does not fit.
    pub fn byte_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(self.byte_len)
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

/// Most rows one request may ask for: the request names them all, so this
/// bounds its frame, and the reply is at most this many rows.
pub const MAX_ROWS_PER_REQUEST: usize = 8192;

/// A table that a client reads row by row instead of whole: the word
/// embeddings, of which a batch uses a few hundred rows out of 150,000.
/// Each row is hashed on its own, so that any set of rows can be checked;
/// the list of those hashes (32 bytes a row, fetched once as
/// [`crate::ObjectRef::RowHashes`]) is itself checked against `row_hashes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowTable {
    /// The tensor's name without any checkpoint prefix.
    pub name: String,
    /// The dtype the rows are served in.
    pub dtype: Dtype,
    pub rows: u64,
    /// Elements in a row.
    pub width: u64,
    /// blake3 of the concatenated blake3 digests of every row, in row order.
    pub row_hashes: Digest,
}

impl RowTable {
    /// Bytes of one row as served.
    pub fn row_bytes(&self) -> u64 {
        self.width.saturating_mul(self.dtype.size_bytes())
    }

    /// Bytes of the list of row hashes.
    pub fn hash_list_bytes(&self) -> u64 {
        self.rows.saturating_mul(32)
    }
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
    /// The dtype in which every floating-point tensor is served (each
    /// [`TensorEntry::dtype`] of a float tensor states it again); integer
    /// tensors keep their own dtype.
    pub weight_dtype: Dtype,
    /// `embeddings`, then `encoder.layer.0..N`, then `pooler` when present.
    pub components: Vec<Component>,
    /// Tables served by rows (the word embeddings), which no component holds.
    pub row_tables: Vec<RowTable>,
}

impl Manifest {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components
            .iter()
            .find(|component| component.name == name)
    }

    pub fn row_table(&self, name: &str) -> Option<&RowTable> {
        self.row_tables.iter().find(|table| table.name == name)
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

    /// Number of layer components. The model's family names them
    /// (`encoder.layer.N`, `encoder.block.N`); what they share is the
    /// number after the last dot.
    pub fn num_layers(&self) -> usize {
        self.components
            .iter()
            .filter(|component| {
                component.name.rsplit_once('.').is_some_and(|(_, index)| {
                    !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .count()
    }

    /// Bytes of all components together.
    pub fn total_bytes(&self) -> u64 {
        self.components.iter().fold(0u64, |total, component| {
            total.saturating_add(component.byte_len)
        })
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
        for table in &self.row_tables {
            hash_field(&mut hasher, table.name.as_bytes());
            hash_field(&mut hasher, table.dtype.name().as_bytes());
            hasher.update(&table.rows.to_le_bytes());
            hasher.update(&table.width.to_le_bytes());
            hasher.update(&table.row_hashes.0);
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Checks what a client cannot afford to take on trust, before any
    /// length in it sizes an allocation or indexes a buffer: that the chunk
    /// size and every component are within bounds, that each component's
    /// tensors lie back to back and fill it exactly, that the chunk hashes
    /// cover it exactly, that tensors hold exactly their shape's elements,
    /// that every float tensor is in the served weight dtype, and that the
    /// revision matches the contents.
    pub fn validate(&self) -> Result<(), Error> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::ChunkSizeOutOfRange {
                chunk_size: self.chunk_size,
                max: MAX_CHUNK_SIZE,
            });
        }
        if !self.weight_dtype.is_float() {
            return Err(invalid(format!(
                "weights are said to be served as {}, which is not a float dtype",
                self.weight_dtype
            )));
        }
        for component in &self.components {
            self.validate_component(component)?;
        }
        for table in &self.row_tables {
            self.validate_row_table(table)?;
        }
        let computed = self.compute_revision();
        if computed != self.revision {
            return Err(invalid(format!(
                "revision {} does not match its contents ({computed})",
                self.revision
            )));
        }
        Ok(())
    }

    fn validate_component(&self, component: &Component) -> Result<(), Error> {
        if component.byte_len > MAX_COMPONENT_BYTES {
            return Err(Error::ComponentTooLarge {
                component: component.name.clone(),
                byte_len: component.byte_len,
                max: MAX_COMPONENT_BYTES,
            });
        }
        let mut tensors_end = 0u64;
        for tensor in &component.tensors {
            let end = tensor.offset.checked_add(tensor.byte_len);
            if tensor.offset != tensors_end || end.is_none_or(|end| end > component.byte_len) {
                return Err(invalid(format!(
                    "tensor {} at {}..+{} does not follow the previous tensor of {} (which ends at {tensors_end}) inside its {} bytes",
                    tensor.name, tensor.offset, tensor.byte_len, component.name, component.byte_len
                )));
            }
            tensors_end = end.unwrap_or(tensors_end);
            self.validate_tensor(tensor)?;
        }
        if tensors_end != component.byte_len {
            return Err(Error::ComponentSpanMismatch {
                component: component.name.clone(),
                byte_len: component.byte_len,
                tensors_end,
            });
        }
        let expected_chunks = component.byte_len.div_ceil(self.chunk_size);
        if component.chunk_hashes.len() as u64 != expected_chunks {
            return Err(invalid(format!(
                "{} has {} chunk hashes for {} bytes",
                component.name,
                component.chunk_hashes.len(),
                component.byte_len
            )));
        }
        Ok(())
    }

    /// A row table's rows and its hash list must each fit what a client
    /// accepts as one object, and its rows be in the served dtype.
    fn validate_row_table(&self, table: &RowTable) -> Result<(), Error> {
        if table.dtype != self.weight_dtype {
            return Err(invalid(format!(
                "row table {} is {} in a manifest of {} weights",
                table.name, table.dtype, self.weight_dtype
            )));
        }
        let largest_reply = table.row_bytes().checked_mul(MAX_ROWS_PER_REQUEST as u64);
        if table.rows == 0
            || table.width == 0
            || largest_reply.is_none_or(|bytes| bytes > MAX_COMPONENT_BYTES)
            || table.hash_list_bytes() > MAX_COMPONENT_BYTES
        {
            return Err(invalid(format!(
                "row table {} of {} rows of {} elements is empty or beyond {MAX_COMPONENT_BYTES} bytes a request",
                table.name, table.rows, table.width
            )));
        }
        Ok(())
    }

    fn validate_tensor(&self, tensor: &TensorEntry) -> Result<(), Error> {
        if tensor.dtype.is_float() && tensor.dtype != self.weight_dtype {
            return Err(invalid(format!(
                "tensor {} is {} in a manifest of {} weights",
                tensor.name, tensor.dtype, self.weight_dtype
            )));
        }
        let expected_len = tensor
            .shape
            .iter()
            .try_fold(1u64, |elements, &dim| elements.checked_mul(dim))
            .and_then(|elements| elements.checked_mul(tensor.dtype.size_bytes()));
        if expected_len != Some(tensor.byte_len) {
            return Err(invalid(format!(
                "tensor {} of shape {:?} and dtype {} has {} bytes",
                tensor.name, tensor.shape, tensor.dtype, tensor.byte_len
            )));
        }
        Ok(())
    }

    /// Where each chunk of `component` ends, paired with its hash. Only
    /// meaningful on a validated manifest; the ends saturate rather than
    /// overflow on any other.
    pub fn chunk_ends(&self, component: &Component) -> Vec<(u64, Digest)> {
        let mut end = 0u64;
        component
            .chunk_hashes
            .iter()
            .map(|digest| {
                end = end.saturating_add(self.chunk_size).min(component.byte_len);
                (end, *digest)
            })
            .collect()
    }
}

fn invalid(detail: String) -> Error {
    Error::InvalidManifest { detail }
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
            weight_dtype: Dtype::F32,
            components: vec![Component::describe("pooler", vec![tensor], &bytes, 4)],
            row_tables: Vec::new(),
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

    fn with_new_revision(mut manifest: Manifest) -> Manifest {
        manifest.revision = manifest.compute_revision();
        manifest
    }

    #[test]
    fn a_chunk_size_of_zero_or_beyond_the_maximum_is_refused() {
        for chunk_size in [0, MAX_CHUNK_SIZE + 1, u64::MAX] {
            let mut manifest = sample_manifest();
            manifest.chunk_size = chunk_size;
            let manifest = with_new_revision(manifest);
            assert!(
                matches!(
                    manifest.validate(),
                    Err(Error::ChunkSizeOutOfRange { chunk_size: found, max: MAX_CHUNK_SIZE })
                        if found == chunk_size
                ),
                "{chunk_size}"
            );
        }
    }

    #[test]
    fn a_component_larger_than_its_tensors_is_refused() {
        // One chunk hash per declared chunk, so that only the span of the
        // tensors can tell the byte length is a lie.
        let mut manifest = sample_manifest();
        manifest.chunk_size = MAX_CHUNK_SIZE;
        let component = &mut manifest.components[0];
        component.byte_len = MAX_CHUNK_SIZE;
        component.chunk_hashes = vec![component.hash];
        let manifest = with_new_revision(manifest);
        assert!(matches!(
            manifest.validate(),
            Err(Error::ComponentSpanMismatch {
                byte_len: MAX_CHUNK_SIZE,
                tensors_end: 10,
                ..
            })
        ));
    }

    #[test]
    fn a_component_over_the_maximum_is_refused_before_its_chunks_are_counted() {
        let mut manifest = sample_manifest();
        manifest.components[0].byte_len = u64::MAX;
        let manifest = with_new_revision(manifest);
        assert!(matches!(
            manifest.validate(),
            Err(Error::ComponentTooLarge {
                byte_len: u64::MAX,
                max: MAX_COMPONENT_BYTES,
                ..
            })
        ));
    }

    #[test]
    fn overlapping_or_gapped_tensors_are_refused() {
        let bytes = [0u8; 8];
        let tensor = |name: &str, offset: u64| TensorEntry {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![4],
            offset,
            byte_len: 4,
            hash: Digest::of(&bytes[..4]),
        };
        for second_offset in [0, 2, 5] {
            let manifest = with_new_revision(Manifest {
                model_id: "tiny".into(),
                revision: String::new(),
                files: BTreeMap::new(),
                chunk_size: 4,
                weight_dtype: Dtype::F32,
                components: vec![Component::describe(
                    "pooler",
                    vec![tensor("a", 0), tensor("b", second_offset)],
                    &bytes,
                    4,
                )],
                row_tables: Vec::new(),
            });
            assert!(
                matches!(manifest.validate(), Err(Error::InvalidManifest { .. })),
                "second tensor at {second_offset}"
            );
        }
    }

    #[test]
    fn chunk_ends_cover_the_component_with_a_short_last_chunk() {
        let manifest = sample_manifest();
        let ends: Vec<u64> = manifest
            .chunk_ends(&manifest.components[0])
            .into_iter()
            .map(|(end, _)| end)
            .collect();
        assert_eq!(ends, [4, 8, 10]);
    }

    /// A manifest of one f16 tensor of shape `[2, 3]` served as `weight_dtype`.
    fn float_manifest(weight_dtype: Dtype) -> Manifest {
        let bytes = vec![0u8; 12];
        let tensor = TensorEntry {
            name: "pooler.dense.weight".into(),
            dtype: Dtype::F16,
            shape: vec![2, 3],
            offset: 0,
            byte_len: 12,
            hash: Digest::of(&bytes),
        };
        let mut manifest = Manifest {
            model_id: "tiny".into(),
            revision: String::new(),
            files: BTreeMap::new(),
            chunk_size: 8,
            weight_dtype,
            components: vec![Component::describe("pooler", vec![tensor], &bytes, 8)],
            row_tables: Vec::new(),
        };
        manifest.revision = manifest.compute_revision();
        manifest
    }

    #[test]
    fn float_tensors_must_be_in_the_served_dtype() {
        float_manifest(Dtype::F16)
            .validate()
            .expect("an f16 tensor in an f16 manifest is valid");
        let error = float_manifest(Dtype::F32)
            .validate()
            .expect_err("an f16 tensor in an f32 manifest is not");
        assert!(
            error.to_string().contains("f16 in a manifest of f32"),
            "{error}"
        );
        // Integer tensors keep their own dtype whatever the weights are.
        sample_manifest().validate().expect("u8 in an f32 manifest");
    }

    #[test]
    fn byte_length_must_match_shape_and_dtype() {
        let mut manifest = float_manifest(Dtype::F16);
        manifest.components[0].tensors[0].shape = vec![3, 3];
        assert!(matches!(
            manifest.validate(),
            Err(Error::InvalidManifest { .. })
        ));
        manifest.components[0].tensors[0].shape = vec![u64::MAX, 4];
        assert!(
            matches!(manifest.validate(), Err(Error::InvalidManifest { .. })),
            "an overflowing shape is refused, not wrapped"
        );
        manifest.components[0].tensors[0].shape = vec![1 << 62, 0, 5];
        assert!(matches!(
            manifest.validate(),
            Err(Error::InvalidManifest { .. })
        ));
    }

    #[test]
    fn a_manifest_of_integer_weights_is_refused() {
        let mut manifest = float_manifest(Dtype::F16);
        manifest.weight_dtype = Dtype::I32;
        assert!(matches!(
            manifest.validate(),
            Err(Error::InvalidManifest { .. })
        ));
    }

    #[test]
    fn dtype_names_round_trip_for_the_servable_ones() {
        for dtype in Dtype::SERVABLE {
            assert_eq!(dtype.to_string().parse::<Dtype>(), Ok(dtype));
        }
        assert_eq!("F16".parse::<Dtype>(), Ok(Dtype::F16));
        assert_eq!(Dtype::BF16.to_string(), "bf16");
        let error = "bf16".parse::<Dtype>().expect_err("bf16 is not served");
        assert_eq!(error.given, "bf16");
        assert!(error.to_string().contains("f32, f16"), "{error}");
    }
}
