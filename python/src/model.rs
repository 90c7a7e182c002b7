//! `StreamingModel`: the engine behind the sentence-transformers `encode`
//! call and the caching guide's statistics and controls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use rustls::pki_types::pem::PemObject;
use surf_engine::{Engine, Eviction, Prompt, RemoteSource, Tokens, VramBudget, WeightDtype};
use surf_transport::{CertificateDer, ClientConfig};

use crate::error::{BindingError, without_gil};
use crate::server::{WeightServer, resolve};

const MIB: u64 = 1 << 20;

/// Where a model's weights come from, as the constructor's arguments name them.
enum WeightOrigin {
    Folder(PathBuf),
    Servers {
        addresses: Vec<SocketAddr>,
        trusted: Vec<CertificateDer<'static>>,
    },
}

/// A sentence-embedding model whose weights are read from a folder or
/// streamed from weight servers, layer by layer, under a GPU memory budget.
#[pyclass(module = "surfing_weights._native", subclass, frozen)]
pub struct StreamingModel {
    engine: Arc<Engine>,
    /// Servers this model streams from that Python handed in or that it
    /// started itself: held so that they outlive the model.
    servers: Vec<Py<WeightServer>>,
}

/// The certificates `server_cert` names: PEM text, or a PEM file's path.
fn trusted_certificates(
    server_cert: &Bound<'_, PyAny>,
) -> Result<Vec<CertificateDer<'static>>, BindingError> {
    if let Ok(text) = server_cert.extract::<String>()
        && text.contains("-----BEGIN")
    {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| BindingError::invalid(format!("server_cert is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(BindingError::invalid("server_cert holds no certificate"));
        }
        return Ok(certs);
    }
    let path: PathBuf = server_cert.extract().map_err(|_| {
        BindingError::invalid("server_cert must be PEM text or the path of a PEM file")
    })?;
    Ok(surf_transport::tls::load_certificates_pem(&path)?)
}

/// Splits `server` (a WeightServer, an address, or a list of them) into
/// running servers and addresses.
fn server_list<'py>(
    server: &Bound<'py, PyAny>,
) -> Result<(Vec<Bound<'py, WeightServer>>, Vec<String>), BindingError> {
    let items: Vec<Bound<'py, PyAny>> =
        if server.is_instance_of::<PyString>() || server.is_instance_of::<WeightServer>() {
            vec![server.clone()]
        } else {
            server.extract().map_err(|_| {
                BindingError::invalid(
                    "server must be a WeightServer, an address \"host:port\", or a list of them",
                )
            })?
        };
    if items.is_empty() {
        return Err(BindingError::invalid("server is an empty list"));
    }
    let mut running = Vec::new();
    let mut addresses = Vec::new();
    for item in items {
        if let Ok(weight_server) = item.cast::<WeightServer>() {
            running.push(weight_server.clone());
        } else if let Ok(address) = item.extract::<String>() {
            addresses.push(address);
        } else {
            return Err(BindingError::invalid(format!(
                "server entries must be WeightServer objects or \"host:port\" strings, not {}",
                item.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            )));
        }
    }
    Ok((running, addresses))
}

/// The texts of an argument that is one string or a list of strings, and
/// whether it was one string.
fn texts_of(argument: &Bound<'_, PyAny>, name: &str) -> Result<(Vec<String>, bool), BindingError> {
    let invalid = || BindingError::invalid(format!("{name} must be a string or a list of strings"));
    if argument.is_instance_of::<PyString>() {
        return Ok((vec![argument.extract().map_err(|_| invalid())?], true));
    }
    Ok((argument.extract().map_err(|_| invalid())?, false))
}

/// `host:port` (or `[v6]:port`) to a socket address.
fn parse_address(address: &str) -> Result<SocketAddr, BindingError> {
    let invalid = || BindingError::invalid(format!("{address:?} is not a \"host:port\" address"));
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    resolve(host.trim_start_matches('[').trim_end_matches(']'), port)
}

fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Reports encoding progress: a tqdm bar when tqdm is installed, otherwise
/// a line on stderr per batch.
struct Progress<'py> {
    bar: Option<Bound<'py, PyAny>>,
    total: usize,
    done: usize,
}

impl<'py> Progress<'py> {
    fn new(py: Python<'py>, total: usize) -> PyResult<Self> {
        let bar = match py.import("tqdm.auto") {
            Ok(module) => {
                let kwargs = PyDict::new(py);
                kwargs.set_item("total", total)?;
                kwargs.set_item("desc", "Batches")?;
                kwargs.set_item("unit", "text")?;
                Some(module.getattr("tqdm")?.call((), Some(&kwargs))?)
            }
            Err(_) => None,
        };
        Ok(Progress {
            bar,
            total,
            done: 0,
        })
    }

    fn advance(&mut self, py: Python<'py>, texts: usize) -> PyResult<()> {
        self.done += texts;
        match &self.bar {
            Some(bar) => {
                bar.call_method1("update", (texts,))?;
            }
            None => {
                let line = format!("encoded {}/{} texts\n", self.done, self.total);
                py.import("sys")?
                    .getattr("stderr")?
                    .call_method1("write", (line,))?;
            }
        }
        Ok(())
    }

    fn close(&self) -> PyResult<()> {
        if let Some(bar) = &self.bar {
            bar.call_method0("close")?;
        }
        Ok(())
    }
}

/// A serde value as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value)
        .map_err(|e| BindingError::Panic(format!("statistics do not serialize: {e}")))?;
    py.import("json")?.call_method1("loads", (text,))
}

impl StreamingModel {
    /// Token ids of `texts`, computed with the GIL released.
    fn tokens_of(&self, py: Python<'_>, texts: Vec<String>) -> Result<Vec<Tokens>, BindingError> {
        let engine = Arc::clone(&self.engine);
        without_gil(py, move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(engine.tokenize(&refs)?)
        })
    }

    fn layers(&self) -> usize {
        self.engine.spec().config.num_layers()
    }

    /// Embeds `texts` longest first in batches of `batch_size`, as
    /// sentence-transformers does; vectors come back in input order.
    fn embed_sorted<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        batch_size: usize,
        mut progress: Option<Progress<'py>>,
    ) -> PyResult<Vec<Vec<f32>>> {
        let tokens = self.tokens_of(py, texts)?;
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].len()));
        let mut vectors = vec![Vec::new(); tokens.len()];
        for chunk in order.chunks(batch_size) {
            let batch: Vec<Tokens> = chunk.iter().map(|&i| tokens[i].clone()).collect();
            let engine = Arc::clone(&self.engine);
            let embedded = without_gil(py, move || Ok(engine.embed_tokens(&batch)?))?;
            for (&i, vector) in chunk.iter().zip(embedded) {
                vectors[i] = vector;
            }
            if let Some(progress) = progress.as_mut() {
                progress.advance(py, chunk.len())?;
            }
        }
        if let Some(progress) = &progress {
            progress.close()?;
        }
        Ok(vectors)
    }
}

#[pymethods]
impl StreamingModel {
    #[new]
    #[pyo3(signature = (
        model_path=None, server=None, server_cert=None, token=None, cache_size=None,
        vram_budget_mb=None, host_cache_mb=512, prefetch=2, eviction="optimal", dtype="f32"
    ))]
    #[allow(clippy::too_many_arguments)] // the constructor of the original project, keyword by keyword
    fn new(
        py: Python<'_>,
        model_path: Option<PathBuf>,
        server: Option<Bound<'_, PyAny>>,
        server_cert: Option<Bound<'_, PyAny>>,
        token: Option<String>,
        cache_size: Option<usize>,
        vram_budget_mb: Option<u64>,
        host_cache_mb: u64,
        prefetch: usize,
        eviction: &str,
        dtype: &str,
    ) -> PyResult<Self> {
        let eviction: Eviction =
            eviction
                .parse()
                .map_err(|e: surf_engine::paging::UnknownEviction| {
                    BindingError::invalid(e.to_string())
                })?;
        let dtype: WeightDtype = dtype
            .parse()
            .map_err(|e: surf_engine::dtype::UnknownDtype| BindingError::invalid(e.to_string()))?;
        let budget = match (cache_size, vram_budget_mb) {
            (Some(_), Some(_)) => {
                return Err(BindingError::invalid(
                    "give cache_size (layers) or vram_budget_mb (MiB), not both",
                )
                .into());
            }
            (Some(layers), None) => VramBudget::Layers(layers),
            (None, Some(mb)) => VramBudget::Bytes(mb.saturating_mul(MIB)),
            (None, None) => VramBudget::Unbounded,
        };

        let mut servers: Vec<Py<WeightServer>> = Vec::new();
        let origin = match (model_path, server) {
            (Some(_), Some(_)) => {
                return Err(BindingError::invalid(
                    "give model_path or server, not both: a model is read from a folder or streamed",
                )
                .into());
            }
            (Some(folder), None) => WeightOrigin::Folder(folder),
            (None, Some(server)) => {
                let (running, named) = server_list(&server)?;
                let mut addresses = Vec::new();
                let mut trusted = Vec::new();
                for weight_server in running {
                    let (address, certificate) = weight_server.get().endpoint()?;
                    addresses.push(address);
                    trusted.push(certificate);
                    servers.push(weight_server.unbind());
                }
                if !named.is_empty() {
                    let Some(pem) = &server_cert else {
                        return Err(BindingError::invalid(
                            "a server address needs server_cert: the certificate to trust, as PEM text or a file",
                        )
                        .into());
                    };
                    trusted.extend(trusted_certificates(pem)?);
                    for address in &named {
                        addresses.push(parse_address(address)?);
                    }
                }
                WeightOrigin::Servers { addresses, trusted }
            }
            (None, None) => {
                // As `surf embed` does: the default model, streamed from a
                // weight server in this process.
                let folder =
                    surf_server::cli::engine_args::default_model_dir().map_err(|error| {
                        match error.downcast::<surf_engine::Error>() {
                            Ok(engine_error) => BindingError::Engine(engine_error),
                            Err(other) => BindingError::DefaultModel(format!("{other:#}")),
                        }
                    })?;
                let embedded = WeightServer::started(py, folder, dtype.wire())?;
                let (address, certificate) = embedded.endpoint()?;
                servers.push(Py::new(py, embedded)?);
                WeightOrigin::Servers {
                    addresses: vec![address],
                    trusted: vec![certificate],
                }
            }
        };

        let engine = without_gil(py, move || {
            let builder = Engine::builder()
                .vram_budget(budget)
                .host_cache_bytes(host_cache_mb.saturating_mul(MIB))
                .prefetch(prefetch)
                .eviction(eviction)
                .weight_dtype(dtype);
            let builder = match origin {
                WeightOrigin::Folder(folder) => builder.model_dir(folder),
                WeightOrigin::Servers { addresses, trusted } => {
                    let mut config = ClientConfig::new(addresses, trusted);
                    config.token = token;
                    config.weight_dtype = dtype.wire();
                    builder.source(Arc::new(RemoteSource::connect(config)?))
                }
            };
            Ok(builder.build()?)
        })?;
        Ok(StreamingModel {
            engine: Arc::new(engine),
            servers,
        })
    }

    /// Embeds one text (a vector of `dimension` floats) or a list of texts
    /// (an array of shape `(n, dimension)`), as sentence-transformers does.
    #[pyo3(signature = (
        sentences, batch_size=32, normalize_embeddings=None, prompt_name=None,
        convert_to_numpy=true, show_progress_bar=false, prompt=None
    ))]
    #[allow(clippy::too_many_arguments)] // sentence-transformers' keywords, one by one
    fn encode<'py>(
        &self,
        py: Python<'py>,
        sentences: &Bound<'py, PyAny>,
        batch_size: usize,
        normalize_embeddings: Option<bool>,
        prompt_name: Option<&str>,
        convert_to_numpy: bool,
        show_progress_bar: bool,
        prompt: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if batch_size == 0 {
            return Err(BindingError::invalid("batch_size must be at least 1").into());
        }
        // As sentence-transformers: `prompt` wins over `prompt_name`, and
        // with neither, the model's default prompt, if it names one.
        let chosen = match (prompt, prompt_name) {
            (Some(text), _) => Prompt::Text(text),
            (None, Some(name)) => Prompt::Named(name),
            (None, None) => Prompt::Default,
        };
        let prefix = self
            .engine
            .prompt_text(chosen)
            .map_err(|e| BindingError::invalid(e.to_string()))?
            .unwrap_or_default()
            .to_string();
        let (mut texts, single) = texts_of(sentences, "sentences")?;
        if !prefix.is_empty() {
            texts
                .iter_mut()
                .for_each(|text| text.insert_str(0, &prefix));
        }
        let progress = if show_progress_bar {
            Some(Progress::new(py, texts.len())?)
        } else {
            None
        };
        let mut vectors = self.embed_sorted(py, texts, batch_size, progress)?;
        if normalize_embeddings == Some(true) {
            vectors.iter_mut().for_each(|v| l2_normalize(v));
        }
        let dimension = self.engine.dimension();
        if !convert_to_numpy {
            return Ok(if single {
                PyList::new(py, &vectors[0])?.into_any()
            } else {
                PyList::new(py, &vectors)?.into_any()
            });
        }
        let rows = vectors.len();
        let flat = PyArray1::from_vec(py, vectors.concat());
        Ok(if single {
            flat.into_any()
        } else {
            flat.reshape([rows, dimension])?.into_any()
        })
    }

    /// Token ids as the model sees them, padded to the longest text:
    /// `input_ids`, `token_type_ids` and `attention_mask`, int64 arrays `(n, length)`.
    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let tokens = self.tokens_of(py, texts_of(texts, "texts")?.0)?;
        let width = tokens.iter().map(Tokens::len).max().unwrap_or(0);
        let padded = |row: &dyn Fn(&Tokens) -> Vec<i64>| {
            let flat: Vec<i64> = tokens
                .iter()
                .flat_map(|t| {
                    let mut values = row(t);
                    values.resize(width, 0);
                    values
                })
                .collect();
            PyArray1::from_vec(py, flat).reshape([tokens.len(), width])
        };
        let result = PyDict::new(py);
        result.set_item(
            "input_ids",
            padded(&|t| t.ids.iter().map(|&id| i64::from(id)).collect())?,
        )?;
        result.set_item(
            "token_type_ids",
            padded(&|t| t.type_ids.iter().map(|&id| i64::from(id)).collect())?,
        )?;
        result.set_item("attention_mask", padded(&|t| vec![1; t.len()])?)?;
        Ok(result)
    }

    /// Latency and paging statistics, as `surf embed --stats` prints them.
    fn get_inference_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stats = self.engine.inference_stats().map_err(BindingError::from)?;
        let value = serde_json::to_value(stats)
            .map_err(|e| BindingError::Panic(format!("statistics do not serialize: {e}")))?;
        to_python(py, &value)
    }

    /// What GPU and host memory hold, with `cache_size` (layer slots) and
    /// the hit rate beside them.
    fn get_cache_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let info = self.engine.cache_info().map_err(BindingError::from)?;
        let stats = self.engine.inference_stats().map_err(BindingError::from)?;
        let mut value = serde_json::to_value(&info)
            .map_err(|e| BindingError::Panic(format!("cache info does not serialize: {e}")))?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert("cache_size".into(), info.layer_slots.into());
            fields.insert("num_layers".into(), self.layers().into());
            fields.insert("cache_hit_rate".into(), stats.cache_hit_rate.into());
            fields.insert(
                "host_cache_hit_rate".into(),
                stats.host_cache_hit_rate.into(),
            );
        }
        to_python(py, &value)
    }

    /// Drops every paged layer from GPU memory and the host cache.
    fn clear_cache(&self, py: Python<'_>) -> PyResult<()> {
        let engine = Arc::clone(&self.engine);
        Ok(without_gil(py, move || Ok(engine.clear_cache()?))?)
    }

    /// Loads `layers` (all that fit when omitted) into GPU memory ahead of use.
    #[pyo3(signature = (layers=None))]
    fn warmup(&self, py: Python<'_>, layers: Option<Vec<usize>>) -> PyResult<()> {
        let engine = Arc::clone(&self.engine);
        let total = self.layers();
        Ok(without_gil(py, move || {
            let layers = match layers {
                Some(layers) => layers,
                None => (0..engine.cache_info()?.layer_slots.min(total)).collect(),
            };
            Ok(engine.warmup(&layers)?)
        })?)
    }

    /// Encoder layers held in GPU memory at once.
    #[getter]
    fn get_cache_size(&self) -> PyResult<usize> {
        Ok(self
            .engine
            .cache_info()
            .map_err(BindingError::from)?
            .layer_slots)
    }

    #[setter]
    fn set_cache_size(&self, py: Python<'_>, layers: usize) -> PyResult<()> {
        let engine = Arc::clone(&self.engine);
        Ok(without_gil(py, move || Ok(engine.set_cache_size(layers)?))?)
    }

    /// The GPU memory budget for weights in MiB; `None` when unbounded.
    #[getter]
    fn get_vram_budget_mb(&self) -> PyResult<Option<f64>> {
        let info = self.engine.cache_info().map_err(BindingError::from)?;
        Ok(info.budget_bytes.map(|bytes| bytes as f64 / MIB as f64))
    }

    #[setter]
    fn set_vram_budget_mb(&self, py: Python<'_>, megabytes: u64) -> PyResult<()> {
        let engine = Arc::clone(&self.engine);
        Ok(without_gil(py, move || {
            Ok(engine.set_vram_budget(megabytes)?)
        })?)
    }

    /// Length of each embedding.
    #[getter]
    fn dimension(&self) -> usize {
        self.engine.dimension()
    }

    /// Tokens kept of a longer text.
    #[getter]
    fn max_seq_length(&self) -> usize {
        self.engine.spec().max_seq_length
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.layers()
    }

    /// The folder's name, or the weight server's model id.
    #[getter]
    fn model_id(&self) -> String {
        self.engine.model_id().to_string()
    }

    /// Seconds of each of `rounds` calls of the Rust engine's own `infer` on
    /// `sentences`, with no Python in between: the baseline of the bench.
    fn _time_engine(
        &self,
        py: Python<'_>,
        sentences: Vec<String>,
        rounds: usize,
    ) -> PyResult<Vec<f64>> {
        let engine = Arc::clone(&self.engine);
        Ok(without_gil(py, move || {
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            (0..rounds)
                .map(|_| {
                    let started = Instant::now();
                    engine.infer(&refs)?;
                    Ok(started.elapsed().as_secs_f64())
                })
                .collect()
        })?)
    }

    fn __repr__(&self) -> String {
        format!(
            "StreamingModel({:?}, dimension={}, layers={}, streamed_from={} server(s))",
            self.engine.model_id(),
            self.engine.dimension(),
            self.layers(),
            self.servers.len()
        )
    }
}
