//! The wgpu device: adapter choice, real limits, buffer helpers.

use std::sync::Arc;

use crate::error::{Error, Result};

pub use wgpu::Features;

/// Environment variable naming a substring of the adapter to use.
pub const ADAPTER_ENV: &str = "SURF_ADAPTER";

/// Environment variable choosing the limits the device is created with:
/// `adapter` (the default: everything the adapter offers) or `default`
/// (wgpu's defaults, the limits every desktop GPU and WebGPU have).
pub const LIMITS_ENV: &str = "SURF_LIMITS";

/// Which limits the device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitsRequest {
    /// Everything the adapter offers: big models need large bindings.
    #[default]
    Adapter,
    /// wgpu's default limits only (128 MiB storage bindings, 256 MiB
    /// buffers, 16 KiB of workgroup memory, 256 invocations), to check that
    /// the engine runs within what any desktop GPU allows.
    Default,
}

impl LimitsRequest {
    const NAMES: [(&'static str, LimitsRequest); 2] = [
        ("adapter", LimitsRequest::Adapter),
        ("default", LimitsRequest::Default),
    ];

    pub fn name(self) -> &'static str {
        match self {
            LimitsRequest::Adapter => "adapter",
            LimitsRequest::Default => "default",
        }
    }

    /// Parses a `SURF_LIMITS` value; empty means `adapter`.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(LimitsRequest::Adapter);
        }
        Self::NAMES
            .iter()
            .find_map(|(name, request)| (*name == text).then_some(*request))
            .ok_or_else(|| Error::LimitsChoice {
                value: text.to_string(),
                accepted: Self::NAMES.map(|(name, _)| name).join(", "),
            })
    }

    /// The request `SURF_LIMITS` makes; `Adapter` when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(LIMITS_ENV) {
            Ok(value) => Self::parse(&value),
            Err(_) => Ok(LimitsRequest::Adapter),
        }
    }

    /// The limits to create the device with on an adapter offering
    /// `adapter`. wgpu's defaults keep the adapter's buffer alignments,
    /// which are requirements, not allowances.
    pub fn limits(self, adapter: &wgpu::Limits) -> wgpu::Limits {
        match self {
            LimitsRequest::Adapter => adapter.clone(),
            LimitsRequest::Default => wgpu::Limits::default().using_alignment(adapter.clone()),
        }
    }
}

/// The size a buffer of `bytes` bytes is created with: storage and uniform
/// buffers are padded to whole 16-byte vec4s.
pub fn padded_size(bytes: u64) -> u64 {
    bytes.max(16).next_multiple_of(16)
}

/// One GPU device and queue, shared by every kernel launcher.
#[derive(Clone)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: Arc<wgpu::AdapterInfo>,
    /// The limits the device was created with (see `LimitsRequest`).
    pub limits: wgpu::Limits,
    /// Which limits were asked for.
    pub limits_request: LimitsRequest,
    /// What the adapter offers, whether or not the device asked for it.
    pub adapter_features: wgpu::Features,
    pub subgroups: bool,
    /// Whether the device was created with timestamp queries, which time
    /// kernels on the GPU's own clock.
    pub timestamps: bool,
    /// Whether the device was created with f16 arithmetic in shaders, which
    /// the half-precision kernel family needs.
    pub shader_f16: bool,
    /// Validation and out-of-memory errors the device raised since the last
    /// `check_errors`; wgpu would otherwise panic on them.
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    /// The driver's compiled pipelines, kept on disk between starts where the
    /// backend supports it (Vulkan).
    pipeline_cache: Option<Arc<StoredPipelineCache>>,
}

/// A pipeline cache and the file it was loaded from and is saved to.
struct StoredPipelineCache {
    cache: wgpu::PipelineCache,
    path: std::path::PathBuf,
    /// Bytes read at start, to skip saving when nothing was added.
    loaded_len: usize,
}

/// The pipeline cache saved at `path` by an earlier start, or an empty one.
fn load_pipeline_cache(device: &wgpu::Device, path: std::path::PathBuf) -> StoredPipelineCache {
    let data = std::fs::read(&path).ok();
    #[allow(unsafe_code)]
    // SAFETY: the data is either absent or what `save_pipeline_cache` wrote
    // from `PipelineCache::get_data` into surf's own cache folder, under a
    // name that is wgpu's key for this adapter. wgpu and the driver check its
    // header and, with `fallback`, start empty on data they do not accept.
    let cache = unsafe {
        device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
            label: Some("surf pipelines"),
            data: data.as_deref(),
            fallback: true,
        })
    };
    let loaded_len = data.as_ref().map_or(0, Vec::len);
    tracing::debug!(path = %path.display(), bytes = loaded_len, "pipeline cache loaded");
    StoredPipelineCache {
        cache,
        path,
        loaded_len,
    }
}

fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    /// Opens the best adapter: discrete, then integrated, then software;
    /// `SURF_ADAPTER` (a case-insensitive name substring) overrides the order.
    pub fn new() -> Result<Self> {
        let wanted = std::env::var(ADAPTER_ENV).ok().filter(|s| !s.is_empty());
        let limits = LimitsRequest::from_env()?;
        pollster::block_on(Self::open(wanted.as_deref(), limits))
    }

    async fn open(wanted: Option<&str>, limits_request: LimitsRequest) -> Result<Self> {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
        descriptor.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        // `WGPU_DEBUG=0` and the like override the build's defaults: CI's
        // validation-layer run turns off the shader debug info that Debian's
        // layer (1.3.239) is too old to parse.
        descriptor.flags = descriptor.flags.with_env();
        let instance = wgpu::Instance::new(descriptor);
        let mut adapters = instance.enumerate_adapters(descriptor_backends()).await;
        adapters
            .retain(|a| a.get_info().device_type != wgpu::DeviceType::Other || wanted.is_some());
        if adapters.is_empty() {
            return Err(Error::NoAdapter {
                detail: String::new(),
                hint: no_adapter_hint(&gpu_vendors_present()),
            });
        }
        let adapter = match wanted {
            Some(name) => {
                let needle = name.to_lowercase();
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                    .ok_or_else(|| Error::NoAdapter {
                        detail: format!(
                            " whose name contains `{name}` ({ADAPTER_ENV}); available: {}",
                            names.join(", ")
                        ),
                        hint: no_adapter_hint(&gpu_vendors_present()),
                    })?
            }
            None => {
                adapters.sort_by_key(|a| {
                    let info = a.get_info();
                    // Vulkan first among equals: it is the best-tested compute path.
                    (
                        rank(info.device_type),
                        info.backend != wgpu::Backend::Vulkan,
                    )
                });
                adapters.remove(0)
            }
        };
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        let subgroups = adapter.features().contains(wgpu::Features::SUBGROUP);
        let mut required_features = wgpu::Features::empty();
        if subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        if timestamps {
            required_features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        if shader_f16 {
            required_features |= wgpu::Features::SHADER_F16;
        }
        let cache_file = wgpu::util::pipeline_cache_key(&info)
            .filter(|_| adapter.features().contains(wgpu::Features::PIPELINE_CACHE))
            .and_then(|key| Some(crate::kernels::tuning_cache::cache_dir()?.join(key)));
        if cache_file.is_some() {
            required_features |= wgpu::Features::PIPELINE_CACHE;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("surf"),
                required_features,
                required_limits: limits_request.limits(&adapter_limits),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device {
                adapter: info.name.clone(),
                message: e.to_string(),
            })?;
        let limits = device.limits();
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            tracing::error!("GPU error: {error}");
            if let Ok(mut list) = sink.lock() {
                list.push(error.to_string());
            }
        }));
        let pipeline_cache = cache_file.map(|path| Arc::new(load_pipeline_cache(&device, path)));
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            subgroups,
            limits = limits_request.name(),
            "GPU device ready"
        );
        Ok(Self {
            device,
            queue,
            info: Arc::new(info),
            limits,
            limits_request,
            adapter_features: adapter.features(),
            subgroups,
            timestamps,
            shader_f16,
            errors,
            pipeline_cache,
        })
    }

    /// The pipeline cache new pipelines should use, where there is one.
    pub fn pipeline_cache(&self) -> Option<&wgpu::PipelineCache> {
        self.pipeline_cache.as_ref().map(|stored| &stored.cache)
    }

    /// Writes the pipeline cache back to its file when pipelines were added
    /// to it, so that the next start skips their compilation. Failing to
    /// write only costs that time, so it is logged, not returned.
    pub fn save_pipeline_cache(&self) {
        let Some(stored) = &self.pipeline_cache else {
            return;
        };
        let Some(data) = stored.cache.get_data() else {
            return;
        };
        if data.len() == stored.loaded_len {
            return;
        }
        if let Err(error) = crate::kernels::tuning_cache::write_atomically(&stored.path, &data) {
            tracing::warn!(path = %stored.path.display(), %error, "could not save the pipeline cache");
        } else {
            tracing::debug!(path = %stored.path.display(), bytes = data.len(), "pipeline cache saved");
        }
    }

    /// Returns the first error the device raised since the last call, if any.
    pub fn check_errors(&self) -> Result<()> {
        let mut list = self
            .errors
            .lock()
            .map_err(|_| Error::Gpu("the GPU error log is poisoned".into()))?;
        match list.drain(..).next() {
            Some(first) => Err(Error::Gpu(first)),
            None => Ok(()),
        }
    }

    /// Opens error scopes for validation, out-of-memory and internal errors
    /// on this thread. wgpu keeps scopes per thread, so errors raised by the
    /// work recorded until [`GpuErrorScope::finish`] belong to the caller
    /// alone, not to another engine sharing the device.
    pub fn error_scope(&self) -> GpuErrorScope {
        // Innermost last: `finish` pops them in reverse.
        GpuErrorScope {
            guards: [
                wgpu::ErrorFilter::Internal,
                wgpu::ErrorFilter::OutOfMemory,
                wgpu::ErrorFilter::Validation,
            ]
            .map(|filter| self.device.push_error_scope(filter)),
        }
    }

    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    /// Whether the adapter computes on the host's CPU cores (llvmpipe, WARP,
    /// SwiftShader), which the rest of the process then competes for.
    pub fn device_type(&self) -> wgpu::DeviceType {
        self.info.device_type
    }

    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Fails unless one binding of `bytes` fits the device, at the padded
    /// size `storage_buffer` creates it with: a binding within the limit by
    /// less than its padding would otherwise pass here and fail in wgpu.
    pub fn check_binding_size(&self, what: &'static str, bytes: u64) -> Result<()> {
        let limit = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        let needed = padded_size(bytes);
        if needed > limit {
            return Err(Error::AdapterLimit {
                adapter: self.info.name.clone(),
                what,
                needed,
                limit,
            });
        }
        Ok(())
    }

    pub fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded_size(bytes),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    pub fn storage_buffer_with(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let buffer = self.storage_buffer(label, data.len() as u64);
        self.queue.write_buffer(&buffer, 0, data);
        buffer
    }

    pub fn uniform_buffer(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded_size(data.len() as u64),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, data);
        buffer
    }

    /// Blocks until the device has finished all submitted work, so that a
    /// host clock around a submission measures the GPU's time.
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        Ok(())
    }

    /// Blocks until `submission` has run and the callbacks it completes
    /// (buffer mappings) have been called; later submissions may still run.
    pub fn wait_for(&self, submission: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        Ok(())
    }

    /// Copies `bytes` bytes from the start of `buffer` back to the host.
    pub fn read_buffer(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, staging.size());
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let _ = sender.send(result);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        receiver
            .recv()
            .map_err(|_| Error::Gpu("the readback was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping the readback failed: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("reading the readback failed: {e}")))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        self.check_errors()?;
        Ok(out)
    }
}

/// Error scopes opened by [`Gpu::error_scope`].
#[must_use = "finish() tells whether the scoped work raised an error"]
pub struct GpuErrorScope {
    guards: [wgpu::ErrorScopeGuard; 3],
}

impl GpuErrorScope {
    /// Closes the scopes and returns the first error raised inside them.
    pub fn finish(self) -> Result<()> {
        let mut first = None;
        for guard in self.guards.into_iter().rev() {
            if let Some(error) = pollster::block_on(guard.pop())
                && first.is_none()
            {
                first = Some(error);
            }
        }
        match first {
            Some(error) => Err(Error::Gpu(error.to_string())),
            None => Ok(()),
        }
    }
}

/// PCI vendor ids of the display devices this machine shows (Linux: DRM
/// cards, and NVIDIA's device node where its driver's container runtime
/// exposes no DRM card).
fn gpu_vendors_present() -> Vec<u32> {
    let mut vendors: Vec<u32> = std::fs::read_dir("/sys/class/drm")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|card| std::fs::read_to_string(card.path().join("device/vendor")).ok())
        .filter_map(|id| u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok())
        .collect();
    if std::path::Path::new("/dev/nvidia0").exists() {
        vendors.push(NVIDIA);
    }
    vendors.sort_unstable();
    vendors.dedup();
    vendors
}

const NVIDIA: u32 = 0x10de;

/// The vendor's name for a PCI vendor id of a GPU maker.
fn gpu_vendor_name(vendor: u32) -> Option<&'static str> {
    match vendor {
        NVIDIA => Some("NVIDIA"),
        0x1002 => Some("AMD"),
        0x8086 => Some("Intel"),
        0x5143 => Some("Qualcomm"),
        0x13b5 => Some("Arm"),
        _ => None,
    }
}

/// What to do when no adapter was found, given the GPU makers' devices the
/// machine shows: with a GPU, its driver is missing (recommending a software
/// rasterizer there would hide the card); without one, a software Vulkan
/// driver runs everything.
fn no_adapter_hint(vendors: &[u32]) -> String {
    let makers: Vec<&str> = vendors.iter().filter_map(|&v| gpu_vendor_name(v)).collect();
    if makers.is_empty() {
        "On Linux without a GPU, install a software Vulkan driver: \
         `apt-get install -y mesa-vulkan-drivers`"
            .into()
    } else {
        format!(
            "This machine has a GPU ({}) that no driver exposes: install its Vulkan driver \
             (an ICD file under /usr/share/vulkan/icd.d or /etc/vulkan/icd.d, e.g. the \
             driver's nvidia_icd.json), or try the GL backend with WGPU_BACKEND=gl",
            makers.join(", ")
        )
    }
}

fn descriptor_backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

/// Opens the default GPU for a test, or tells why not. Outside CI a machine
/// without an adapter skips GPU tests with a message; under `CI=true` it is a
/// failure, because CI installs a software adapter.
pub fn gpu_for_tests() -> Option<Gpu> {
    match Gpu::new() {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter is usable: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LimitsRequest, padded_size};

    #[test]
    fn limits_parse_by_name_and_reject_others_listing_the_accepted() {
        assert_eq!(LimitsRequest::parse("").ok(), Some(LimitsRequest::Adapter));
        assert_eq!(
            LimitsRequest::parse("default").ok(),
            Some(LimitsRequest::Default)
        );
        assert_eq!(
            LimitsRequest::parse(" adapter ").ok(),
            Some(LimitsRequest::Adapter)
        );
        let error = LimitsRequest::parse("webgl").expect_err("unknown");
        assert!(error.is_bad_input());
        let message = error.to_string();
        assert!(message.contains("`webgl`"), "{message}");
        assert!(message.contains("adapter, default"), "{message}");
    }

    #[test]
    fn default_limits_are_wgpus_with_the_adapters_alignments() {
        let adapter = wgpu::Limits {
            max_storage_buffer_binding_size: 4 << 30,
            min_uniform_buffer_offset_alignment: 64,
            ..wgpu::Limits::default()
        };
        let asked = LimitsRequest::Default.limits(&adapter);
        assert_eq!(asked.max_storage_buffer_binding_size, 128 << 20);
        assert_eq!(asked.max_buffer_size, 256 << 20);
        assert_eq!(asked.max_compute_workgroup_storage_size, 16 << 10);
        assert_eq!(asked.max_compute_invocations_per_workgroup, 256);
        assert_eq!(asked.min_uniform_buffer_offset_alignment, 64);
        assert_eq!(LimitsRequest::Adapter.limits(&adapter), adapter);
    }

    #[test]
    fn without_an_adapter_a_machine_with_a_gpu_is_told_to_install_its_driver() {
        use super::no_adapter_hint;
        let software = no_adapter_hint(&[]);
        assert!(software.contains("mesa-vulkan-drivers"), "{software}");
        // A virtual display device (e.g. 0x1234, QEMU) is no GPU maker's.
        assert!(no_adapter_hint(&[0x1234]).contains("mesa-vulkan-drivers"));
        let nvidia = no_adapter_hint(&[0x10de]);
        assert!(!nvidia.contains("mesa"), "{nvidia}");
        assert!(nvidia.contains("NVIDIA"), "{nvidia}");
        assert!(nvidia.contains("WGPU_BACKEND=gl"), "{nvidia}");
        assert!(no_adapter_hint(&[0x1002, 0x8086]).contains("AMD, Intel"));
    }

    #[test]
    fn bindings_are_padded_to_whole_vec4s() {
        assert_eq!(padded_size(0), 16);
        assert_eq!(padded_size(17), 32);
        assert_eq!(padded_size(128 << 20), 128 << 20);
        assert_eq!(padded_size((128 << 20) - 4), 128 << 20);
        assert_eq!(padded_size((128 << 20) + 4), (128 << 20) + 16);
    }
}
