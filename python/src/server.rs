//! `WeightServer`: the QUIC weight server of `surf serve`, run inside the
//! Python process on a tokio runtime of its own.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use surf_server::{RunningServer, ServerConfig};
use surf_transport::CertificateDer;

use crate::error::{BindingError, without_gil};

const MIB: u64 = 1 << 20;
/// The cache of assembled components, as `surf serve --cache-mb` defaults to.
const DEFAULT_CACHE_MB: u64 = 256;

/// A started server and the runtime its tasks run on.
struct Running {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningServer>,
}

impl Running {
    fn server(&self) -> Result<&RunningServer, BindingError> {
        self.server.as_ref().ok_or(BindingError::ServerNotRunning)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Lets fetches in flight finish instead of cutting clients off.
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// A weight server for one model folder, serving its layers over QUIC from
/// threads of this process.
#[pyclass(module = "surfing_weights._native", frozen)]
pub struct WeightServer {
    model_path: PathBuf,
    listen: SocketAddr,
    cache_bytes: u64,
    token: Option<String>,
    dtype: surf_transport::Dtype,
    running: Mutex<Option<Running>>,
}

/// Resolves `host` and `port` to the first address they name.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, BindingError> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| BindingError::invalid(format!("cannot resolve the address {host}:{port}")))
}

impl WeightServer {
    /// Starts a server from Rust, for a model given neither a folder nor servers.
    pub fn started(
        py: Python<'_>,
        model_path: PathBuf,
        dtype: surf_transport::Dtype,
    ) -> Result<Self, BindingError> {
        let server = WeightServer {
            model_path,
            listen: ([127, 0, 0, 1], 0).into(),
            cache_bytes: DEFAULT_CACHE_MB * MIB,
            token: None,
            dtype,
            running: Mutex::new(None),
        };
        server.start_inner(py)?;
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // A panic while the lock was held left nothing half-changed: the
        // slot is either a whole server or none.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where clients connect, and the certificate they pin.
    pub fn endpoint(&self) -> Result<(SocketAddr, CertificateDer<'static>), BindingError> {
        let running = self.lock();
        let server = running
            .as_ref()
            .ok_or(BindingError::ServerNotRunning)?
            .server()?;
        Ok((server.local_addr(), server.certificate_der().clone()))
    }

    fn start_inner(&self, py: Python<'_>) -> Result<(), BindingError> {
        let mut running = self.lock();
        if running.is_some() {
            return Ok(());
        }
        let config = ServerConfig {
            cache_bytes: self.cache_bytes,
            token: self.token.clone(),
            weight_dtype: self.dtype,
            ..ServerConfig::new(self.model_path.clone(), self.listen)
        };
        let started = without_gil(py, move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("surf-weight-server")
                .enable_all()
                .build()
                .map_err(BindingError::Runtime)?;
            let server = runtime.block_on(surf_server::WeightServer::bind(config))?;
            Ok(Running {
                runtime,
                server: Some(server),
            })
        })?;
        *running = Some(started);
        Ok(())
    }
}

#[pymethods]
impl WeightServer {
    #[new]
    #[pyo3(signature = (model_path, cache_size_mb=DEFAULT_CACHE_MB, host="127.0.0.1", port=0, token=None, dtype="f32"))]
    fn new(
        model_path: PathBuf,
        cache_size_mb: u64,
        host: &str,
        port: u16,
        token: Option<String>,
        dtype: &str,
    ) -> PyResult<Self> {
        let dtype: surf_transport::Dtype = dtype
            .parse()
            .map_err(|e: surf_transport::ParseDtypeError| BindingError::invalid(e.to_string()))?;
        Ok(WeightServer {
            model_path,
            listen: resolve(host, port)?,
            cache_bytes: cache_size_mb.saturating_mul(MIB),
            token,
            dtype,
            running: Mutex::new(None),
        })
    }

    /// Loads the model and starts serving; does nothing when already running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.start_inner(py)?)
    }

    /// Stops serving, letting fetches in flight finish; does nothing when stopped.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let stopped = self.lock().take();
        without_gil(py, move || {
            drop(stopped);
            Ok(())
        })?;
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start_inner(slf.py())?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    #[getter]
    fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// `host:port` that clients connect to.
    #[getter]
    fn address(&self) -> PyResult<String> {
        Ok(self.endpoint()?.0.to_string())
    }

    /// The server's self-signed certificate (PEM), for clients to pin.
    #[getter]
    fn cert_pem(&self) -> PyResult<String> {
        let running = self.lock();
        let server = running
            .as_ref()
            .ok_or(BindingError::ServerNotRunning)?
            .server()?;
        Ok(server.certificate_pem().unwrap_or_default().to_string())
    }

    #[getter]
    fn model_path(&self) -> PathBuf {
        self.model_path.clone()
    }

    #[getter]
    fn dtype(&self) -> String {
        self.dtype.to_string()
    }

    fn __repr__(&self) -> String {
        match self.endpoint() {
            Ok((addr, _)) => format!(
                "WeightServer({:?}, address={addr:?}, running)",
                self.model_path
            ),
            Err(_) => format!("WeightServer({:?}, stopped)", self.model_path),
        }
    }
}
