//! Where weights come from: a model folder on disk, or a weight server reached
//! through `surf_transport::WeightClient`. The engine asks for components
//! (`embeddings`, a layer such as `encoder.layer.N`, `head`), named by the
//! model's family, and reads their tensors by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::remote_rows::{DEFAULT_ROW_CACHE_BYTES, RemoteRows};
use crate::weights::{SafetensorsFile, TensorSource, decode, decode_f16, decode_rows};

/// One component's tensors, and how many bytes were read or received for it.
pub struct FetchedComponent {
    pub tensors: Box<dyn TensorSource + Send + Sync>,
    pub bytes: u64,
}

/// A source of model files and weights.
pub trait WeightSource: Send + Sync {
    /// Where the weights come from, for messages.
    fn origin(&self) -> String;
    /// The model's configuration and tokenizer.
    fn spec(&self) -> Result<ModelSpec>;
    /// Reads one component.
    fn fetch(&self, component: &str) -> Result<FetchedComponent>;
    /// The model's name, as the service reports it.
    fn model_id(&self) -> String;
    /// A revision that changes whenever the weights do, where the source knows one.
    fn revision(&self) -> Option<String> {
        None
    }
}

/// A model folder: `model.safetensors` memory-mapped.
pub struct LocalSource {
    dir: PathBuf,
    file: Arc<SafetensorsFile>,
    spec: ModelSpec,
    /// Bytes stored per component, by the family's grouping of tensors.
    component_bytes: std::collections::HashMap<String, u64>,
}

impl LocalSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let spec = ModelSpec::from_dir(dir)?;
        let weights_path = dir.join(surf_transport::WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(Error::bad_model(&weights_path, "file is missing"));
        }
        let config = &spec.config;
        let file = SafetensorsFile::open(&weights_path)?
            .with_prefix_of(config.checkpoint_prefixes(), config.anchor_tensor())?;
        // Refuse a broken checkpoint before touching the GPU.
        let architecture = config.architecture();
        let mut expected = crate::model::model_tensors(architecture.as_ref())?;
        if let Some(word) = expected.first_mut() {
            // The tensor the family reads its words from, as this file names it.
            word.0 = architecture.word_table(&file).to_string();
        }
        file.check(&expected)?;
        let mut component_bytes = std::collections::HashMap::new();
        for (name, bytes) in file.tensor_sizes()? {
            if let Some(component) = config.component_of(&name) {
                *component_bytes
                    .entry(config.component_name(component))
                    .or_insert(0) += bytes;
            }
        }
        Ok(Self {
            dir: dir.into(),
            file: Arc::new(file),
            spec,
            component_bytes,
        })
    }
}

struct SharedFile(Arc<SafetensorsFile>);

impl TensorSource for SharedFile {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.0.tensor(name, shape)
    }

    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.0.tensor_f16(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    fn gather_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.0.gather_rows(name, shape, ids, out)
    }
}

impl WeightSource for LocalSource {
    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn model_id(&self) -> String {
        self.dir
            .file_name()
            .map_or_else(|| self.origin(), |name| name.to_string_lossy().into_owned())
    }

    fn spec(&self) -> Result<ModelSpec> {
        Ok(self.spec.clone())
    }

    fn fetch(&self, component: &str) -> Result<FetchedComponent> {
        let bytes = self.component_bytes.get(component).copied().unwrap_or(0);
        Ok(FetchedComponent {
            tensors: Box::new(SharedFile(Arc::clone(&self.file))),
            bytes,
        })
    }
}

/// A weight server. Fetches block on the client's own runtime, so the engine's
/// threads need no async runtime of their own.
pub struct RemoteSource {
    client: surf_transport::WeightClient,
    runtime: tokio::runtime::Handle,
    /// Bytes of word-table rows kept on this side.
    row_cache_bytes: u64,
    /// The runtime `connect` made, kept alive as long as the source.
    _owned_runtime: Option<tokio::runtime::Runtime>,
}

impl RemoteSource {
    /// Wraps a client whose connection lives on `runtime`.
    pub fn new(client: surf_transport::WeightClient, runtime: tokio::runtime::Handle) -> Self {
        Self {
            client,
            runtime,
            row_cache_bytes: DEFAULT_ROW_CACHE_BYTES,
            _owned_runtime: None,
        }
    }

    /// Connects to the servers of `config` on a runtime of its own.
    pub fn connect(config: surf_transport::ClientConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("surf-net")
            .enable_all()
            .build()
            .map_err(|e| Error::WeightSource(format!("cannot start the network runtime: {e}")))?;
        let client = drive(
            runtime.handle(),
            surf_transport::WeightClient::connect(config),
        )?
        .map_err(Error::Transport)?;
        Ok(Self {
            client,
            runtime: runtime.handle().clone(),
            row_cache_bytes: DEFAULT_ROW_CACHE_BYTES,
            _owned_runtime: Some(runtime),
        })
    }

    /// Bounds the word-table rows kept on this side, in bytes (default
    /// [`DEFAULT_ROW_CACHE_BYTES`]); rows beyond it are fetched again when
    /// a batch uses them.
    pub fn with_row_cache_bytes(mut self, bytes: u64) -> Self {
        self.row_cache_bytes = bytes;
        self
    }

    pub fn client(&self) -> &surf_transport::WeightClient {
        &self.client
    }

    fn label(&self) -> PathBuf {
        PathBuf::from(format!(
            "weight server model {}",
            self.client.manifest().model_id
        ))
    }
}

/// The bytes of one received component and its tensor table.
impl Drop for RemoteSource {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which tokio forbids
        // inside another runtime; a source may well be dropped there.
        if let Some(runtime) = self._owned_runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on `runtime` and waits for it from synchronous code, which
/// may itself be running inside a tokio runtime (a service's handler):
/// - outside any runtime, it blocks on `runtime` directly;
/// - on a multi-thread runtime, it tells tokio that this thread blocks, so
///   the runtime's other work moves to other threads;
/// - on a current-thread runtime, it hands the future to `runtime`'s own
///   threads and waits, which cannot work when `runtime` is a current-thread
///   runtime too: nothing would drive it while this thread waits, so that is
///   an error instead of a hang.
pub(crate) fn drive<F>(runtime: &tokio::runtime::Handle, future: F) -> Result<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tokio::runtime::RuntimeFlavor;
    let Ok(current) = tokio::runtime::Handle::try_current() else {
        return Ok(runtime.block_on(future));
    };
    if current.runtime_flavor() == RuntimeFlavor::MultiThread {
        return Ok(tokio::task::block_in_place(|| runtime.block_on(future)));
    }
    if runtime.runtime_flavor() == RuntimeFlavor::CurrentThread {
        return Err(Error::WeightSource(
            "the weight source's runtime is a current-thread runtime, and it is called from \
             inside a current-thread runtime that it would block; give the source a \
             multi-thread runtime or call the engine from a thread of its own"
                .into(),
        ));
    }
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver
        .recv()
        .map_err(|_| Error::WeightSource("the weight source's runtime shut down".into()))
}

struct ComponentTensors {
    origin: PathBuf,
    bytes: bytes::Bytes,
    entries: Vec<surf_transport::TensorEntry>,
    /// The word table, read by rows, for the pinned component of a server
    /// that serves it so.
    rows: Option<RemoteRows>,
}

fn safetensors_dtype(dtype: surf_transport::Dtype) -> safetensors::Dtype {
    use surf_transport::Dtype as D;
    match dtype {
        D::Bool => safetensors::Dtype::BOOL,
        D::U8 => safetensors::Dtype::U8,
        D::I8 => safetensors::Dtype::I8,
        D::I16 => safetensors::Dtype::I16,
        D::I32 => safetensors::Dtype::I32,
        D::I64 => safetensors::Dtype::I64,
        D::F16 => safetensors::Dtype::F16,
        D::BF16 => safetensors::Dtype::BF16,
        D::F32 => safetensors::Dtype::F32,
        D::F64 => safetensors::Dtype::F64,
    }
}

impl ComponentTensors {
    fn stored<T>(
        &self,
        name: &str,
        shape: &[usize],
        read: impl FnOnce(&Path, &str, safetensors::Dtype, &[usize], &[u8], &[usize]) -> Result<T>,
    ) -> Result<T> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.clone(),
                tensor: name.into(),
            })?;
        let range = entry.byte_range();
        let data = self
            .bytes
            .get(range.start as usize..range.end as usize)
            .ok_or_else(|| {
                Error::WeightSource(format!("tensor {name} lies outside its component"))
            })?;
        let actual: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
        read(
            &self.origin,
            name,
            safetensors_dtype(entry.dtype),
            &actual,
            data,
            shape,
        )
    }
}

impl ComponentTensors {
    /// The row table `name`, when this component reads it by rows.
    fn rows_of(&self, name: &str) -> Option<&RemoteRows> {
        self.rows.as_ref().filter(|rows| rows.name() == name)
    }

    fn refuse_whole_table(&self, name: &str) -> Error {
        Error::WeightSource(format!(
            "{name} is served by rows from {}; it is never read whole",
            self.origin.display()
        ))
    }
}

impl TensorSource for ComponentTensors {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if self.rows_of(name).is_some() {
            return Err(self.refuse_whole_table(name));
        }
        self.stored(name, shape, decode)
    }

    fn tensor_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        if self.rows_of(name).is_some() {
            return Err(self.refuse_whole_table(name));
        }
        self.stored(name, shape, decode_f16)
    }

    fn contains(&self, name: &str) -> bool {
        self.rows_of(name).is_some() || self.entries.iter().any(|e| e.name == name)
    }

    fn gather_rows(
        &self,
        name: &str,
        shape: &[usize],
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if let Some(rows) = self.rows_of(name) {
            return rows.gather(shape, ids, out);
        }
        self.stored(name, shape, |path, name, dtype, actual, data, shape| {
            decode_rows(path, name, dtype, actual, data, shape, ids, out)
        })
    }

    fn bytes_received(&self) -> u64 {
        self.rows.as_ref().map_or(0, RemoteRows::received)
    }
}

impl WeightSource for RemoteSource {
    fn origin(&self) -> String {
        self.label().display().to_string()
    }

    fn model_id(&self) -> String {
        self.client.manifest().model_id.clone()
    }

    fn revision(&self) -> Option<String> {
        Some(self.client.manifest().revision.clone())
    }

    fn spec(&self) -> Result<ModelSpec> {
        let manifest = self.client.manifest();
        ModelSpec::from_files(&self.label(), |name| {
            Ok(manifest.file(name).map(<[u8]>::to_vec))
        })
    }

    fn fetch(&self, component: &str) -> Result<FetchedComponent> {
        let manifest = self.client.manifest();
        let entries = manifest
            .component(component)
            .ok_or_else(|| Error::WeightSource(format!("the server has no component {component}")))?
            .tensors
            .clone();
        let client = self.client.clone();
        let name = component.to_string();
        let bytes = drive(
            &self.runtime,
            async move { client.fetch_component(&name).await },
        )?
        .map_err(|source| Error::Fetch {
            component: component.to_string(),
            source,
        })?;
        let len = bytes.len() as u64;
        // Only the server's word table is served by rows, and only the
        // pinned component reads it.
        let rows = (component == crate::model::PINNED_COMPONENT)
            .then(|| manifest.row_tables.first())
            .flatten()
            .map(|table| {
                RemoteRows::new(
                    self.client.clone(),
                    self.runtime.clone(),
                    table.clone(),
                    self.label(),
                    self.row_cache_bytes,
                )
            });
        Ok(FetchedComponent {
            tensors: Box::new(ComponentTensors {
                origin: self.label(),
                bytes,
                entries,
                rows,
            }),
            bytes: len,
        })
    }
}
