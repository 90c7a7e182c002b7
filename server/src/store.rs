//! The model as the server holds it: the safetensors file memory-mapped, its
//! tensors grouped into components as the model's family lays them out
//! (`surf_engine::ModelConfig::component_of`), and the manifest describing them. Float
//! tensors stored in another dtype than the one served are converted (with
//! the `half` crate, bf16 through f32, never reinterpreted); the manifest
//! describes and hashes the converted bytes, which are what is sent.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;
use surf_transport::manifest::DEFAULT_CHUNK_SIZE;
use surf_transport::manifest::RowTable;
use surf_transport::wire::FetchRefusal;
use surf_transport::{Component, Digest, Dtype, Manifest, TensorEntry, wire};

use crate::Error;
use surf_engine::ModelConfig;
use surf_engine::model::{Component as ModelComponent, HEAD_COMPONENT, PINNED_COMPONENT};

/// The weights file inside a model folder.
pub use surf_transport::WEIGHTS_FILE;
/// The small files that travel in the manifest, named one by one: what a
/// model's config, its tokenizer and sentence-transformers read from the
/// folder. Anything else that happens to sit beside them (notes, keys,
/// training data) stays on the server.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];
/// The file of each sentence-transformers module folder (`1_Pooling/`, ...).
const MODULE_CONFIG_FILE: &str = "config.json";
/// A module's weights (a Dense module's `linear.*`).
const MODULE_WEIGHTS_FILE: &str = surf_engine::config::MODULE_WEIGHTS_FILE;
/// Module folders looked in even without a `modules.json` naming them.
const DEFAULT_MODULE_FOLDERS: &[&str] = &["1_Pooling", "2_Normalize"];
/// The sentence-transformers file that names the module folders.
const MODULES_FILE: &str = "modules.json";
/// Room left in the manifest message for everything but the files.
const MANIFEST_HEADROOM: usize = 1024 * 1024;
/// `embeddings.position_ids` is an `arange` buffer some exporters save, not a
/// weight: it is left out of the `embeddings` component.
const SKIPPED_TENSORS: &[&str] = &["embeddings.position_ids"];

/// Where a component's bytes are in the file.
#[derive(Debug, Clone)]
enum Layout {
    /// The tensors sit back to back in the file: served straight from the map.
    Contiguous(Range<usize>),
    /// The tensors are scattered: served from a copy that is assembled on
    /// demand and kept in the cache.
    Gathered(Vec<Range<usize>>),
    /// Some tensors are served in another dtype than stored: converted on
    /// demand, once per stay in the cache.
    Converted(Vec<Piece>),
}

/// One tensor of a converted component: where it is in the file, as what
/// it is stored and as what it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    file_range: Range<usize>,
    stored: Dtype,
    served: Dtype,
}

/// A model folder opened for serving.
pub struct ModelStore {
    path: PathBuf,
    file: Bytes,
    manifest: Arc<Manifest>,
    layouts: HashMap<String, Layout>,
    row_tables: HashMap<String, RowLayout>,
}

/// Where a row table is in the file, and its rows' hashes as served.
struct RowLayout {
    file_range: Range<usize>,
    stored: Dtype,
    served: Dtype,
    rows: u64,
    width: u64,
    /// The 32-byte digest of every row, back to back.
    hashes: Bytes,
}

/// One tensor as found in the file.
struct FileTensor {
    name: String,
    /// The dtype it is served in.
    dtype: Dtype,
    /// The dtype it is stored in.
    stored: Dtype,
    shape: Vec<u64>,
    file_range: Range<usize>,
}

/// Keeps the map alive for as long as any `Bytes` slice of it exists.
struct MappedFile(Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl ModelStore {
    /// Opens `model_dir`, validates its safetensors file and hashes every
    /// component with its float tensors as `weight_dtype` (f32 or f16).
    /// Blocking: this reads the whole file once, converting what needs it.
    pub fn open(model_dir: &Path, weight_dtype: Dtype) -> Result<Self, Error> {
        let metadata = std::fs::metadata(model_dir).map_err(|source| Error::ModelDir {
            path: model_dir.to_owned(),
            source,
        })?;
        if !metadata.is_dir() {
            return Err(Error::ModelDir {
                path: model_dir.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let weights_path = model_dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(Error::MissingWeights { path: weights_path });
        }
        if !weight_dtype.is_servable() {
            return Err(Error::UnservableDtype {
                dtype: weight_dtype,
            });
        }
        let file = map_file(&weights_path)?;
        // A broken checkpoint is named as such before its config is read.
        read_tensors(&weights_path, &file)?;
        let config = read_config(model_dir)?;
        let (components, layouts, row_layouts) =
            split_into_components(&weights_path, &file, weight_dtype, &config)?;
        let row_tables = row_layouts
            .iter()
            .map(|(name, layout)| RowTable {
                name: name.clone(),
                dtype: layout.served,
                rows: layout.rows,
                width: layout.width,
                row_hashes: Digest::of(&layout.hashes),
            })
            .collect();
        let files = read_small_files(model_dir)?;

        let model_id = model_dir
            .canonicalize()
            .ok()
            .and_then(|path| {
                path.file_name()
                    .map(|name| name.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "model".to_owned());
        let mut manifest = Manifest {
            model_id,
            revision: String::new(),
            files,
            chunk_size: DEFAULT_CHUNK_SIZE,
            weight_dtype,
            components,
            row_tables,
        };
        manifest.revision = manifest.compute_revision();
        Ok(ModelStore {
            path: weights_path,
            file,
            manifest: Arc::new(manifest),
            layouts,
            row_tables: row_layouts.into_iter().collect(),
        })
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn weights_path(&self) -> &Path {
        &self.path
    }

    /// The component's bytes when they can be served straight from the map.
    pub fn mapped_component(&self, name: &str) -> Option<Bytes> {
        match self.layouts.get(name)? {
            Layout::Contiguous(range) => Some(self.file.slice(range.clone())),
            Layout::Gathered(_) | Layout::Converted(_) => None,
        }
    }

    /// Whether serving the component means converting some of its tensors
    /// (work worth sharing with other servers), not only reading the file.
    pub fn is_converted(&self, name: &str) -> bool {
        matches!(self.layouts.get(name), Some(Layout::Converted(_)))
    }

    /// The digests of every row of a row table, back to back.
    pub fn row_hashes(&self, table: &str) -> Option<Bytes> {
        Some(self.row_tables.get(table)?.hashes.clone())
    }

    /// Rows `rows` of a row table as served, back to back; `None` for an
    /// unknown table. Rows are read from the map one by one, so asking for a
    /// few rows of a large table touches only those.
    pub fn rows(&self, table: &str, rows: &[u32]) -> Option<Result<Bytes, FetchRefusal>> {
        let layout = self.row_tables.get(table)?;
        if let Some(&row) = rows.iter().find(|&&row| u64::from(row) >= layout.rows) {
            return Some(Err(FetchRefusal::RowOutOfBounds {
                row,
                rows: layout.rows,
            }));
        }
        let stored_row = layout.stored_row_bytes();
        let mut bytes = Vec::with_capacity(rows.len() * layout.served_row_bytes());
        for &row in rows {
            let start = layout.file_range.start + row as usize * stored_row;
            convert_into(
                &self.file[start..start + stored_row],
                layout.stored,
                layout.served,
                &mut bytes,
            );
        }
        Some(Ok(Bytes::from(bytes)))
    }

    /// Copies a scattered component together, converting the tensors served
    /// in another dtype; `None` for unknown names.
    pub fn gather_component(&self, name: &str) -> Option<Bytes> {
        let layout = self.layouts.get(name)?;
        Some(match assemble(&self.file, layout) {
            std::borrow::Cow::Borrowed(bytes) => Bytes::copy_from_slice(bytes),
            std::borrow::Cow::Owned(bytes) => Bytes::from(bytes),
        })
    }
}

/// `config.json`, read as the engine reads it: its family decides which
/// tensors make a component.
fn read_config(model_dir: &Path) -> Result<ModelConfig, Error> {
    let path = model_dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| Error::ModelFile {
        path: path.clone(),
        source,
    })?;
    ModelConfig::from_json(&path, &bytes).map_err(|error| Error::InvalidModel {
        path: path.clone(),
        detail: error.to_string(),
    })
}

fn map_file(path: &Path) -> Result<Bytes, Error> {
    let file = File::open(path).map_err(|source| Error::WeightsFile {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: the map is read-only. Its contents could change if another
    // process rewrote the file while it is served; the bytes would then fail
    // the clients' hash checks instead of being trusted, and an operator
    // replaces a model by restarting the server on a new file, never by
    // editing it in place.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::WeightsFile {
        path: path.to_owned(),
        source,
    })?;
    Ok(Bytes::from_owner(MappedFile(map)))
}

/// Reads the safetensors header of `file` (named `path` in errors) and
/// groups its tensors into components, their float tensors served as
/// `weight_dtype`: each component described as clients will check it, and
/// where its bytes are in the file. The family's word table, when it is a
/// float table, is served by rows instead of in a component.
#[allow(clippy::type_complexity)]
fn split_into_components(
    path: &Path,
    file: &[u8],
    weight_dtype: Dtype,
    config: &ModelConfig,
) -> Result<
    (
        Vec<Component>,
        HashMap<String, Layout>,
        Vec<(String, RowLayout)>,
    ),
    Error,
> {
    let mut tensors = read_tensors(path, file)?;
    for tensor in &mut tensors {
        if tensor.stored.is_float() {
            tensor.dtype = weight_dtype;
        }
    }
    let word_table = word_table_name(&tensors, config);
    let (groups, word) = group_into_components(path, tensors, config, word_table)?;
    let described = describe_components(file, &groups);
    let layouts = groups
        .iter()
        .map(|(name, tensors)| (name.clone(), layout_of(tensors)))
        .collect();
    let row_layouts = word
        .map(|tensor| {
            let layout = row_layout(file, &tensor);
            (tensor.name, layout)
        })
        .into_iter()
        .collect();
    Ok((described, layouts, row_layouts))
}

/// The tensor the family reads its words from, as the engine would choose
/// it among the names in the file (T5 has two names for it).
fn word_table_name(tensors: &[FileTensor], config: &ModelConfig) -> &'static str {
    let names: std::collections::HashSet<&str> = tensors
        .iter()
        .map(|tensor| {
            config
                .checkpoint_prefixes()
                .iter()
                .find_map(|prefix| tensor.name.strip_prefix(prefix))
                .unwrap_or(&tensor.name)
        })
        .collect();
    config.architecture().word_table(&TensorNames(names))
}

/// Answers which tensors exist and nothing else: what the family needs to
/// name its word table.
struct TensorNames<'a>(std::collections::HashSet<&'a str>);

impl surf_engine::weights::TensorSource for TensorNames<'_> {
    fn tensor(&self, name: &str, _shape: &[usize]) -> surf_engine::Result<Vec<f32>> {
        Err(surf_engine::Error::WeightSource(format!(
            "{name}: only names are known here"
        )))
    }

    fn tensor_f16(&self, name: &str, _shape: &[usize]) -> surf_engine::Result<Vec<half::f16>> {
        Err(surf_engine::Error::WeightSource(format!(
            "{name}: only names are known here"
        )))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// A word table's place in the file and its rows' digests as served, each
/// row converted on its own.
fn row_layout(file: &[u8], tensor: &FileTensor) -> RowLayout {
    let (rows, width) = (tensor.shape[0], tensor.shape[1]);
    let mut layout = RowLayout {
        file_range: tensor.file_range.clone(),
        stored: tensor.stored,
        served: tensor.dtype,
        rows,
        width,
        hashes: Bytes::new(),
    };
    let stored_row = layout.stored_row_bytes();
    let mut hashes = Vec::with_capacity(rows as usize * 32);
    let mut served = Vec::with_capacity(layout.served_row_bytes());
    for row in file[tensor.file_range.clone()].chunks_exact(stored_row.max(1)) {
        served.clear();
        convert_into(row, layout.stored, layout.served, &mut served);
        hashes.extend_from_slice(blake3::hash(&served).as_bytes());
    }
    layout.hashes = Bytes::from(hashes);
    layout
}

impl RowLayout {
    fn stored_row_bytes(&self) -> usize {
        (self.width * self.stored.size_bytes()) as usize
    }

    fn served_row_bytes(&self) -> usize {
        (self.width * self.served.size_bytes()) as usize
    }
}

fn read_tensors(path: &Path, file: &[u8]) -> Result<Vec<FileTensor>, Error> {
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(file).map_err(|source| Error::Safetensors {
            path: path.to_owned(),
            source,
        })?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = convert_dtype(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_owned(),
            tensor: name.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let expected_len = info
            .shape
            .iter()
            .try_fold(dtype.size_bytes(), |len, &dim| len.checked_mul(dim as u64));
        if expected_len != Some((end - start) as u64) {
            return Err(Error::InvalidModel {
                path: path.to_owned(),
                detail: format!(
                    "tensor {name} of shape {:?} and dtype {dtype} has {} bytes",
                    info.shape,
                    end - start
                ),
            });
        }
        tensors.push(FileTensor {
            name,
            dtype,
            stored: dtype,
            shape: info.shape.iter().map(|&dim| dim as u64).collect(),
            file_range: data_start + start..data_start + end,
        });
    }
    tensors.sort_by_key(|tensor| tensor.file_range.start);
    Ok(tensors)
}

fn convert_dtype(dtype: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as St;
    Some(match dtype {
        St::BOOL => Dtype::Bool,
        St::U8 => Dtype::U8,
        St::I8 => Dtype::I8,
        St::I16 => Dtype::I16,
        St::I32 => Dtype::I32,
        St::I64 => Dtype::I64,
        St::F16 => Dtype::F16,
        St::BF16 => Dtype::BF16,
        St::F32 => Dtype::F32,
        St::F64 => Dtype::F64,
        _ => return None,
    })
}

/// Groups tensors into the pinned `embeddings`, the family's layers in
/// order and the classifier's `head`; tensors the engine never reads (a T5
/// decoder, a masked-language-model head) are not served.
#[allow(clippy::type_complexity)]
fn group_into_components(
    path: &Path,
    tensors: Vec<FileTensor>,
    config: &ModelConfig,
    word_table: &str,
) -> Result<(Vec<(String, Vec<FileTensor>)>, Option<FileTensor>), Error> {
    let invalid = |detail: String| Error::InvalidModel {
        path: path.to_owned(),
        detail,
    };
    let mut pinned = Vec::new();
    let mut layers: BTreeMap<usize, Vec<FileTensor>> = BTreeMap::new();
    let mut head = Vec::new();
    let mut word = None;
    let mut seen = std::collections::HashSet::new();
    for mut tensor in tensors {
        let canonical = config
            .checkpoint_prefixes()
            .iter()
            .find_map(|prefix| tensor.name.strip_prefix(prefix))
            .unwrap_or(&tensor.name)
            .to_owned();
        if SKIPPED_TENSORS.contains(&canonical.as_str()) {
            continue;
        }
        let Some(component) = config.component_of(&canonical) else {
            tracing::debug!(tensor = %tensor.name, "not part of any served component");
            continue;
        };
        if !seen.insert(canonical.clone()) {
            return Err(invalid(format!(
                "tensor {canonical} appears both with and without the checkpoint's prefix"
            )));
        }
        tensor.name = canonical;
        let by_rows = tensor.name == word_table
            && tensor.shape.len() == 2
            && tensor.stored.is_float()
            && tensor.shape.iter().all(|&dim| dim > 0);
        if by_rows {
            word = Some(tensor);
            continue;
        }
        match component {
            ModelComponent::Pinned => pinned.push(tensor),
            ModelComponent::Head => head.push(tensor),
            ModelComponent::Layer(index) => layers.entry(index).or_default().push(tensor),
        }
    }
    if pinned.is_empty() && word.is_none() {
        return Err(invalid(format!(
            "it has none of the {} tensors all layers share",
            config.family().name()
        )));
    }
    if layers.is_empty() {
        return Err(invalid(format!(
            "it has no {}.N.* tensors",
            config.layer_prefix()
        )));
    }
    for (expected, &index) in layers.keys().enumerate() {
        if index != expected {
            return Err(invalid(format!(
                "layers are numbered {:?}; expected 0..{}",
                layers.keys().collect::<Vec<_>>(),
                layers.len()
            )));
        }
    }
    let mut groups = vec![(PINNED_COMPONENT.to_owned(), pinned)];
    groups.extend(
        layers
            .into_iter()
            .map(|(index, tensors)| (config.layer_component(index), tensors)),
    );
    if !head.is_empty() {
        groups.push((HEAD_COMPONENT.to_owned(), head));
    }
    Ok((groups, word))
}

fn layout_of(tensors: &[FileTensor]) -> Layout {
    if tensors.iter().any(|tensor| tensor.stored != tensor.dtype) {
        return Layout::Converted(
            tensors
                .iter()
                .map(|tensor| Piece {
                    file_range: tensor.file_range.clone(),
                    stored: tensor.stored,
                    served: tensor.dtype,
                })
                .collect(),
        );
    }
    let contiguous = tensors
        .windows(2)
        .all(|pair| pair[0].file_range.end == pair[1].file_range.start);
    match (contiguous, tensors.first(), tensors.last()) {
        (true, Some(first), Some(last)) => {
            Layout::Contiguous(first.file_range.start..last.file_range.end)
        }
        _ => Layout::Gathered(
            tensors
                .iter()
                .map(|tensor| tensor.file_range.clone())
                .collect(),
        ),
    }
}

fn gather(file: &[u8], pieces: &[Range<usize>]) -> Vec<u8> {
    let len = pieces.iter().map(|piece| piece.len()).sum();
    let mut bytes = Vec::with_capacity(len);
    for piece in pieces {
        bytes.extend_from_slice(&file[piece.clone()]);
    }
    bytes
}

/// Hashes every component, spread over the available cores.
fn describe_components(file: &[u8], groups: &[(String, Vec<FileTensor>)]) -> Vec<Component> {
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(groups.len().max(1));
    let mut described: Vec<Option<Component>> = vec![None; groups.len()];
    std::thread::scope(|scope| {
        let per_worker = groups.len().div_ceil(workers);
        for (group_chunk, out_chunk) in groups
            .chunks(per_worker)
            .zip(described.chunks_mut(per_worker))
        {
            scope.spawn(move || {
                for ((name, tensors), out) in group_chunk.iter().zip(out_chunk) {
                    *out = Some(describe_component(file, name, tensors));
                }
            });
        }
    });
    described.into_iter().flatten().collect()
}

/// Describes a component as it will be served, reading each tensor in
/// blocks and converting block by block: no component or tensor is ever
/// copied whole to hash it.
fn describe_component(file: &[u8], name: &str, tensors: &[FileTensor]) -> Component {
    let mut whole = blake3::Hasher::new();
    let mut chunks = ChunkHasher::new(DEFAULT_CHUNK_SIZE);
    let mut converted = Vec::new();
    let mut offset = 0u64;
    let mut entries = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let mut hasher = blake3::Hasher::new();
        let block_bytes = HASH_BLOCK_ELEMENTS * tensor.stored.size_bytes() as usize;
        let mut byte_len = 0u64;
        for block in file[tensor.file_range.clone()].chunks(block_bytes) {
            let served: &[u8] = if tensor.stored == tensor.dtype {
                block
            } else {
                converted.clear();
                convert_into(block, tensor.stored, tensor.dtype, &mut converted);
                &converted
            };
            hasher.update(served);
            whole.update(served);
            chunks.update(served);
            byte_len += served.len() as u64;
        }
        entries.push(TensorEntry {
            name: tensor.name.clone(),
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
            offset,
            byte_len,
            hash: Digest(*hasher.finalize().as_bytes()),
        });
        offset += byte_len;
    }
    Component {
        name: name.to_owned(),
        byte_len: offset,
        hash: Digest(*whole.finalize().as_bytes()),
        chunk_hashes: chunks.finish(),
        tensors: entries,
    }
}

/// Elements hashed per block when a component is described.
const HASH_BLOCK_ELEMENTS: usize = 1 << 18;

/// blake3 of each `chunk_size` slice of a stream of bytes, as
/// [`surf_transport::manifest::chunk_digests`] gives for the same bytes whole.
struct ChunkHasher {
    chunk_size: u64,
    filled: u64,
    current: blake3::Hasher,
    digests: Vec<Digest>,
}

impl ChunkHasher {
    fn new(chunk_size: u64) -> Self {
        Self {
            chunk_size: chunk_size.max(1),
            filled: 0,
            current: blake3::Hasher::new(),
            digests: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (self.chunk_size - self.filled) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.current.update(now);
            self.filled += now.len() as u64;
            if self.filled == self.chunk_size {
                self.digests
                    .push(Digest(*self.current.finalize().as_bytes()));
                self.current.reset();
                self.filled = 0;
            }
            bytes = rest;
        }
    }

    fn finish(mut self) -> Vec<Digest> {
        if self.filled > 0 {
            self.digests
                .push(Digest(*self.current.finalize().as_bytes()));
        }
        self.digests
    }
}

/// A component's bytes as served: borrowed from the map where they sit back
/// to back as stored, copied together or converted otherwise.
fn assemble<'a>(file: &'a [u8], layout: &Layout) -> std::borrow::Cow<'a, [u8]> {
    match layout {
        Layout::Contiguous(range) => std::borrow::Cow::Borrowed(&file[range.clone()]),
        Layout::Gathered(pieces) => std::borrow::Cow::Owned(gather(file, pieces)),
        Layout::Converted(pieces) => {
            let len = pieces
                .iter()
                .map(|piece| {
                    piece.file_range.len() / piece.stored.size_bytes() as usize
                        * piece.served.size_bytes() as usize
                })
                .sum();
            let mut bytes = Vec::with_capacity(len);
            for piece in pieces {
                convert_into(
                    &file[piece.file_range.clone()],
                    piece.stored,
                    piece.served,
                    &mut bytes,
                );
            }
            std::borrow::Cow::Owned(bytes)
        }
    }
}

/// Elements converted per step: the f32 staging buffers stay on the stack.
const CONVERT_BLOCK: usize = 4096;

/// Appends `stored` (little-endian elements of `from`) as little-endian
/// elements of `to`. Only float tensors are ever given a served dtype other
/// than their own, and only f32 or f16 is served (`open` checks both);
/// anything else is copied as is. Values are converted, never
/// reinterpreted: f16 and bf16 widen to f32 exactly, f32 narrows to f16 with
/// `half` (rounding to nearest even, beyond f16's range to infinity).
fn convert_into(stored: &[u8], from: Dtype, to: Dtype, out: &mut Vec<u8>) {
    let from_size = from.size_bytes() as usize;
    let convertible = from != to
        && matches!(from, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
        && matches!(to, Dtype::F16 | Dtype::F32);
    if !convertible {
        out.extend_from_slice(stored);
        return;
    }
    out.reserve(stored.len() / from_size * to.size_bytes() as usize);
    if from == Dtype::F64 {
        // Straight from f64, so that narrowing to f16 rounds once.
        for word in stored.chunks_exact(8) {
            let mut le = [0u8; 8];
            le.copy_from_slice(word);
            let value = f64::from_le_bytes(le);
            match to {
                Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(value).to_le_bytes()),
                _ => out.extend_from_slice(&(value as f32).to_le_bytes()),
            }
        }
        return;
    }
    let mut wide = [0f32; CONVERT_BLOCK];
    let mut narrow = [half::f16::ZERO; CONVERT_BLOCK];
    for block in stored.chunks(CONVERT_BLOCK * from_size) {
        let wide = &mut wide[..block.len() / from_size];
        for (value, word) in wide.iter_mut().zip(block.chunks_exact(from_size)) {
            *value = match *word {
                [a, b, c, d] => f32::from_le_bytes([a, b, c, d]),
                [a, b] if from == Dtype::BF16 => half::bf16::from_le_bytes([a, b]).to_f32(),
                [a, b] => half::f16::from_le_bytes([a, b]).to_f32(),
                _ => 0.0,
            };
        }
        if to == Dtype::F16 {
            let narrow = &mut narrow[..wide.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(narrow, wide);
            for value in narrow.iter() {
                out.extend_from_slice(&value.to_le_bytes());
            }
        } else {
            for value in wide.iter() {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

/// Reads the configs and tokenizer files that travel in the manifest: those
/// of [`MODEL_FILES`] that exist, and the config of each sentence-transformers
/// module folder.
fn read_small_files(model_dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let limit = wire::limits::HELLO_REPLY - MANIFEST_HEADROOM;
    let mut files = BTreeMap::new();
    let mut total = 0usize;
    let mut add = |relative: String| -> Result<(), Error> {
        let path = model_dir.join(&relative);
        if files.contains_key(&relative) || !path.is_file() {
            return Ok(());
        }
        let contents = std::fs::read(&path).map_err(|source| Error::ModelFile {
            path: path.clone(),
            source,
        })?;
        total = total.saturating_add(contents.len());
        if total > limit {
            return Err(Error::FilesTooLarge { limit });
        }
        files.insert(relative, contents);
        Ok(())
    };
    for name in MODEL_FILES {
        add((*name).to_owned())?;
    }
    // A module's config, and the weights of those that have some (Dense):
    // small, and read by the client with the rest of the pipeline.
    for folder in module_folders(model_dir) {
        add(format!("{folder}/{MODULE_CONFIG_FILE}"))?;
        add(format!("{folder}/{MODULE_WEIGHTS_FILE}"))?;
    }
    Ok(files)
}

/// The module folders of a sentence-transformers model: the defaults, and
/// those its `modules.json` names. Only plain folder names directly inside
/// the model folder count, so a module path cannot reach outside it.
fn module_folders(model_dir: &Path) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Module {
        #[serde(default)]
        path: String,
    }
    let mut folders: Vec<String> = DEFAULT_MODULE_FOLDERS
        .iter()
        .map(|folder| (*folder).to_owned())
        .collect();
    let listed = std::fs::read(model_dir.join(MODULES_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<Module>>(&bytes).ok())
        .unwrap_or_default();
    for module in listed {
        let folder = module.path.trim_end_matches('/');
        let plain = matches!(
            Path::new(folder)
                .components()
                .collect::<Vec<_>>()
                .as_slice(),
            [std::path::Component::Normal(_)]
        ) && !folder.starts_with('.');
        if plain && !folders.iter().any(|known| known == folder) {
            folders.push(folder.to_owned());
        }
    }
    folders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_model_needs_travel() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let write = |relative: &str, contents: &str| {
            let path = dir.path().join(relative);
            std::fs::create_dir_all(path.parent().expect("inside the folder"))
                .expect("the folder is made");
            std::fs::write(path, contents).expect("the file is written");
        };
        write("config.json", "{}");
        write("tokenizer.json", "{}");
        write("vocab.txt", "[PAD]");
        write("spiece.model", "sp");
        write(
            "modules.json",
            r#"[{"path": ""}, {"path": "pooling_here"}, {"path": "../outside"}, {"path": "2_Normalize"}]"#,
        );
        write("1_Pooling/config.json", "{\"pool\": 1}");
        write("pooling_here/config.json", "{\"pool\": 2}");
        write("secret.txt", "hunter2");
        write("other.json", "{}");
        write("notes.model", "x");
        write("1_Pooling/extra.json", "{}");
        write("nested/config.json", "{}");

        let files = read_small_files(dir.path()).expect("the files read");
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "1_Pooling/config.json",
                "config.json",
                "modules.json",
                "pooling_here/config.json",
                "spiece.model",
                "tokenizer.json",
                "vocab.txt",
            ]
        );
        assert_eq!(files["pooling_here/config.json"], b"{\"pool\": 2}");
    }

    /// A BERT config, whose family groups the tensors of these tests.
    fn bert_config() -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 8,
        });
        ModelConfig::from_json(Path::new("config.json"), json.to_string().as_bytes())
            .expect("a valid config")
    }

    /// The component a BERT tensor lands in, by name.
    fn component_of(name: &str) -> Option<String> {
        let config = bert_config();
        config
            .component_of(name)
            .map(|component| config.component_name(component))
    }

    #[test]
    fn back_to_back_tensors_are_served_from_the_map() {
        let tensor = |start: usize, end: usize| FileTensor {
            name: String::new(),
            dtype: Dtype::U8,
            stored: Dtype::U8,
            shape: vec![(end - start) as u64],
            file_range: start..end,
        };
        assert!(matches!(
            layout_of(&[tensor(8, 16), tensor(16, 20)]),
            Layout::Contiguous(range) if range == (8..20)
        ));
        assert!(matches!(
            layout_of(&[tensor(8, 16), tensor(24, 30)]),
            Layout::Gathered(pieces) if pieces == vec![8..16, 24..30]
        ));
        let file: Vec<u8> = (0..40).collect();
        assert_eq!(gather(&file, &[2..4, 10..12]), vec![2, 3, 10, 11]);
    }

    fn f16_words(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    #[test]
    fn floats_convert_to_f16_by_value_and_bf16_is_never_reinterpreted() {
        let values = [0.1f32, -2.5, 65504.0, 1.0e-7, 1.0e6];
        let stored: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        convert_into(&stored, Dtype::F32, Dtype::F16, &mut out);
        let expected: Vec<u16> = values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        assert_eq!(f16_words(&out), expected);

        // 1.5 in bf16 is 0x3FC0; read as f16 bits that would be 1.9375.
        let bf16: Vec<u8> = [1.5f32, -0.0078125]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let mut out = Vec::new();
        convert_into(&bf16, Dtype::BF16, Dtype::F16, &mut out);
        let decoded: Vec<f32> = f16_words(&out)
            .into_iter()
            .map(|w| half::f16::from_bits(w).to_f32())
            .collect();
        assert_eq!(decoded, vec![1.5, -0.0078125]);

        // f16 to f32 widens exactly; same to same copies.
        let mut wide = Vec::new();
        convert_into(&out, Dtype::F16, Dtype::F32, &mut wide);
        assert_eq!(
            wide,
            [1.5f32, -0.0078125]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let mut same = Vec::new();
        convert_into(&out, Dtype::F16, Dtype::F16, &mut same);
        assert_eq!(same, out);
    }

    #[test]
    fn a_converted_component_is_described_by_the_bytes_it_sends() {
        // Two f32 tensors, one u8 tensor that keeps its dtype.
        let mut file = Vec::new();
        for v in [1.0f32, 2.0, 3.0, -4.0] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        file.extend_from_slice(&[7, 8]);
        let tensor = |name: &str, stored: Dtype, served: Dtype, range: Range<usize>| FileTensor {
            name: name.into(),
            dtype: served,
            stored,
            shape: vec![(range.len() as u64) / stored.size_bytes()],
            file_range: range,
        };
        let tensors = [
            tensor("encoder.layer.0.a", Dtype::F32, Dtype::F16, 0..12),
            tensor("encoder.layer.0.b", Dtype::F32, Dtype::F16, 12..16),
            tensor("encoder.layer.0.ids", Dtype::U8, Dtype::U8, 16..18),
        ];
        let component = describe_component(&file, "encoder.layer.0", &tensors);
        let layout = layout_of(&tensors);
        let sent = assemble(&file, &layout);
        assert_eq!(component.byte_len, 6 + 2 + 2);
        assert_eq!(sent.len() as u64, component.byte_len);
        assert!(component.hash.matches(&blake3::hash(&sent)));
        for entry in &component.tensors {
            let bytes = &sent[entry.byte_range().start as usize..entry.byte_range().end as usize];
            assert!(entry.hash.matches(&blake3::hash(bytes)), "{}", entry.name);
        }
        assert_eq!(component.tensors[1].dtype, Dtype::F16);
        assert_eq!(component.tensors[2].dtype, Dtype::U8);
        assert_eq!(&sent[8..], &[7, 8]);
    }

    /// Property tests of the safetensors header parsing: a file the server
    /// is given may be damaged or hostile, and must be refused, not crash
    /// the server. The ignored `stress_*` variants run `SURF_FUZZ_CASES`
    /// (default 20 000) cases each.
    mod fuzz {
        use proptest::prelude::*;
        use proptest::test_runner::TestCaseError;
        use surf_tests::fuzz::{DEFAULT_CASES, check, stress_cases};

        use super::*;

        /// A tensor of a made-up checkpoint: name, dtype, shape.
        type Spec = (String, safetensors::Dtype, Vec<usize>);

        fn tensor_name() -> impl Strategy<Value = String> {
            let prefix = prop_oneof![Just(""), Just("bert.")];
            let body = prop_oneof![
                "[a-z]{1,6}".prop_map(|leaf| format!("embeddings.{leaf}")),
                (0usize..3, "[a-z]{1,6}")
                    .prop_map(|(layer, leaf)| format!("encoder.layer.{layer}.{leaf}")),
                "[a-z]{1,6}".prop_map(|leaf| format!("pooler.{leaf}")),
                "[a-z.]{1,12}",
            ];
            (prefix, body).prop_map(|(prefix, body)| format!("{prefix}{body}"))
        }

        fn spec() -> impl Strategy<Value = Spec> {
            use safetensors::Dtype as St;
            let dtype =
                prop::sample::select(vec![St::F32, St::F16, St::BF16, St::F64, St::U8, St::I64]);
            (tensor_name(), dtype, prop::collection::vec(1usize..6, 1..3))
        }

        /// A safetensors file of `specs` (the first of each name kept), the
        /// tensors in the given order, and each tensor's bytes by name.
        fn checkpoint(specs: &[Spec]) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
            let mut header = serde_json::Map::new();
            let mut data = Vec::new();
            let mut contents = BTreeMap::new();
            for (number, (name, dtype, shape)) in specs.iter().enumerate() {
                if contents.contains_key(name) {
                    continue;
                }
                let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + number) as u8).collect();
                header.insert(
                    name.clone(),
                    serde_json::json!({
                        "dtype": format!("{dtype:?}"),
                        "shape": shape,
                        "data_offsets": [data.len(), data.len() + len],
                    }),
                );
                data.extend_from_slice(&bytes);
                contents.insert(name.clone(), bytes);
            }
            let header = serde_json::to_vec(&header).expect("a JSON header");
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&header);
            file.extend_from_slice(&data);
            (file, contents)
        }

        fn parse(
            file: &[u8],
            weight_dtype: Dtype,
        ) -> Result<(Vec<Component>, HashMap<String, Layout>), Error> {
            split_into_components(
                Path::new("fuzz.safetensors"),
                file,
                weight_dtype,
                &bert_config(),
            )
            .map(|(components, layouts, _)| (components, layouts))
        }

        fn arbitrary_files_are_refused_or_split(cases: u32) {
            let raw = prop::collection::vec(any::<u8>(), 0..256);
            let with_length = (any::<u64>(), prop::collection::vec(any::<u8>(), 0..256)).prop_map(
                |(declared, rest)| {
                    let mut file = declared.to_le_bytes().to_vec();
                    file.extend_from_slice(&rest);
                    file
                },
            );
            let mutated = (
                prop::collection::vec(spec(), 1..6),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                any::<prop::sample::Index>(),
            )
                .prop_map(|(specs, flips, cut)| {
                    let (mut file, _) = checkpoint(&specs);
                    for (at, byte) in flips {
                        let at = at.index(file.len());
                        file[at] ^= byte;
                    }
                    let keep = file.len() - cut.index(file.len() / 8 + 1);
                    file.truncate(keep);
                    file
                });
            let strategy = (prop_oneof![raw, with_length, mutated], any::<bool>());
            check(cases, strategy, |(file, half)| {
                let weight_dtype = if half { Dtype::F16 } else { Dtype::F32 };
                if let Ok((components, layouts)) = parse(&file, weight_dtype) {
                    for component in &components {
                        let layout = &layouts[&component.name];
                        prop_assert_eq!(assemble(&file, layout).len() as u64, component.byte_len);
                    }
                }
                Ok(())
            });
        }

        #[test]
        fn arbitrary_files_are_refused_or_split_default() {
            arbitrary_files_are_refused_or_split(DEFAULT_CASES);
        }

        #[test]
        #[ignore = "stress: SURF_FUZZ_CASES cases"]
        fn stress_arbitrary_files_are_refused_or_split() {
            arbitrary_files_are_refused_or_split(stress_cases());
        }

        fn a_header_longer_than_the_file_is_refused(cases: u32) {
            let strategy = (prop::collection::vec(any::<u8>(), 0..256), 1u64..);
            check(cases, strategy, |(rest, excess)| {
                let declared = (rest.len() as u64).saturating_add(excess);
                let mut file = declared.to_le_bytes().to_vec();
                file.extend_from_slice(&rest);
                let result = parse(&file, Dtype::F32);
                let refused = matches!(result, Err(Error::Safetensors { .. }));
                prop_assert!(
                    refused,
                    "{} bytes declared in a file of {}",
                    declared,
                    file.len()
                );
                Ok(())
            });
        }

        #[test]
        fn a_header_longer_than_the_file_is_refused_default() {
            a_header_longer_than_the_file_is_refused(DEFAULT_CASES);
        }

        #[test]
        #[ignore = "stress: SURF_FUZZ_CASES cases"]
        fn stress_a_header_longer_than_the_file_is_refused() {
            a_header_longer_than_the_file_is_refused(stress_cases());
        }

        /// A checkpoint with embeddings and numbered layers is split into
        /// components whose manifest validates, and whose bytes hold each
        /// tensor as stored when its dtype is the one served.
        fn valid_checkpoints_round_trip(cases: u32) {
            let layers = prop::collection::vec(spec(), 0..8);
            let strategy = (layers, 1usize..3, any::<bool>());
            check(cases, strategy, |(mut specs, layer_count, half)| {
                let weight_dtype = if half { Dtype::F16 } else { Dtype::F32 };
                specs.push((
                    "embeddings.word".into(),
                    safetensors::Dtype::F32,
                    vec![2, 3],
                ));
                for layer in 0..layer_count {
                    specs.push((
                        format!("encoder.layer.{layer}.bias"),
                        safetensors::Dtype::F16,
                        vec![4],
                    ));
                }
                let (file, contents) = checkpoint(&specs);
                let layer_numbers: std::collections::BTreeSet<usize> = contents
                    .keys()
                    .filter_map(|name| {
                        let name = name.strip_prefix("bert.").unwrap_or(name);
                        name.strip_prefix("encoder.layer.")?
                            .split('.')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect();
                let numbered_in_order = layer_numbers
                    .iter()
                    .enumerate()
                    .all(|(expected, &number)| expected == number);
                // Tensors outside every component are skipped unread, so
                // only a component's tensor under both names is refused.
                let prefixed_twice = contents.keys().any(|name| {
                    name.strip_prefix("bert.").is_some_and(|plain| {
                        contents.contains_key(plain) && component_of(plain).is_some()
                    })
                });
                let result = parse(&file, weight_dtype);
                if !numbered_in_order || prefixed_twice {
                    let refused = matches!(result, Err(Error::InvalidModel { .. }));
                    prop_assert!(refused, "{:?}", result.map(|(components, _)| components));
                    return Ok(());
                }
                let (components, layouts) =
                    result.map_err(|error| TestCaseError::fail(error.to_string()))?;
                let mut manifest = Manifest {
                    model_id: "fuzz".into(),
                    revision: String::new(),
                    files: BTreeMap::new(),
                    chunk_size: DEFAULT_CHUNK_SIZE,
                    weight_dtype,
                    components,
                    row_tables: Vec::new(),
                };
                manifest.revision = manifest.compute_revision();
                prop_assert!(manifest.validate().is_ok(), "{:?}", manifest.validate());
                for component in &manifest.components {
                    let bytes = assemble(&file, &layouts[&component.name]);
                    for tensor in &component.tensors {
                        let range = tensor.byte_range();
                        let served = &bytes[range.start as usize..range.end as usize];
                        prop_assert!(tensor.hash.matches(&blake3::hash(served)));
                        let stored = contents
                            .get(&tensor.name)
                            .or_else(|| contents.get(&format!("bert.{}", tensor.name)));
                        let stored = stored
                            .ok_or_else(|| TestCaseError::fail("a tensor not in the file"))?;
                        if stored_dtype_is(&specs, &tensor.name, tensor.dtype) {
                            prop_assert_eq!(served, stored.as_slice(), "{}", tensor.name);
                        }
                    }
                }
                Ok(())
            });
        }

        /// Whether the checkpoint stores `name` (with or without the
        /// `bert.` prefix) in `dtype`, so that it is served unconverted.
        fn stored_dtype_is(specs: &[Spec], name: &str, dtype: Dtype) -> bool {
            specs
                .iter()
                .find(|(stored, _, _)| stored.strip_prefix("bert.").unwrap_or(stored) == name)
                .and_then(|(_, stored, _)| convert_dtype(*stored))
                == Some(dtype)
        }

        #[test]
        fn valid_checkpoints_round_trip_default() {
            valid_checkpoints_round_trip(DEFAULT_CASES);
        }

        #[test]
        #[ignore = "stress: SURF_FUZZ_CASES cases"]
        fn stress_valid_checkpoints_round_trip() {
            valid_checkpoints_round_trip(stress_cases());
        }
    }
}
