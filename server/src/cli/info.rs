//! `surf info`: the adapter, the kernel families it runs, and the measured
//! choice of family per shape with the timings behind it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use surf_engine::gpu::Gpu;
use surf_engine::kernels::family::KernelFamily;
use surf_engine::kernels::selection::TunedShape;
use surf_engine::model::Kernels;
use surf_engine::{ModelSpec, WeightDtype};

use super::engine_args::DEFAULT_MODEL_DIR;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Model folder whose shapes the kernel choices are shown for.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Weight dtype the choices are for.
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    pub dtype: WeightDtype,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct AdapterReport {
    name: String,
    backend: String,
    device_type: String,
    vendor: u32,
    device: u32,
    driver: String,
    driver_info: String,
    subgroups: bool,
    subgroup_min_size: u32,
    subgroup_max_size: u32,
    shader_f16: bool,
    pipeline_cache: bool,
    max_compute_invocations_per_workgroup: u32,
    max_compute_workgroup_storage_size: u32,
    max_storage_buffer_binding_size: u64,
    max_buffer_size: u64,
}

#[derive(Serialize)]
struct FamilyReport {
    name: &'static str,
    workgroup_size: u32,
    workgroup_memory: bool,
    supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    unsupported_because: Option<String>,
}

#[derive(Serialize)]
struct InfoReport {
    adapter: AdapterReport,
    kernel_families: Vec<FamilyReport>,
    /// The forced family, when `SURF_KERNELS` names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    forced: Option<&'static str>,
    autotune: Vec<TunedShape>,
}

fn adapter_report(gpu: &Gpu) -> AdapterReport {
    let info = &gpu.info;
    let limits = &gpu.limits;
    AdapterReport {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        vendor: info.vendor,
        device: info.device,
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        subgroups: gpu.subgroups,
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        shader_f16: gpu
            .adapter_features
            .contains(surf_engine::gpu::Features::SHADER_F16),
        pipeline_cache: gpu.pipeline_cache().is_some(),
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
    }
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::from_dir(&args.model)
        .with_context(|| format!("reading the model's shapes from {}", args.model.display()))?;
    let gpu = Gpu::new()?;
    let mode = surf_engine::engine::kernel_mode_from_env()?;
    let mut kernels = Kernels::new(&gpu, args.dtype);
    kernels.choose(&gpu, mode, &spec.config.dims())?;
    let report = InfoReport {
        adapter: adapter_report(&gpu),
        kernel_families: KernelFamily::ALL
            .into_iter()
            .map(|family| {
                let reason = family.unsupported_reason(&gpu);
                FamilyReport {
                    name: family.name(),
                    workgroup_size: family.workgroup_size(),
                    workgroup_memory: family.workgroup_memory(),
                    supported: reason.is_none(),
                    unsupported_because: reason,
                }
            })
            .collect(),
        forced: match &kernels.selection {
            surf_engine::kernels::selection::Selection::Forced(family) => Some(family.name()),
            _ => None,
        },
        autotune: kernels.selection.tuned().to_vec(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(report: &InfoReport) {
    let a = &report.adapter;
    println!("adapter   {} ({}, {})", a.name, a.backend, a.device_type);
    println!("driver    {} {}", a.driver, a.driver_info);
    println!(
        "subgroups {} (sizes {} to {}), shader-f16 {}, pipeline cache {}",
        a.subgroups, a.subgroup_min_size, a.subgroup_max_size, a.shader_f16, a.pipeline_cache
    );
    println!(
        "limits    {} invocations and {} bytes of workgroup memory a workgroup, {} MiB a storage binding",
        a.max_compute_invocations_per_workgroup,
        a.max_compute_workgroup_storage_size,
        a.max_storage_buffer_binding_size >> 20
    );
    println!();
    println!("kernel families");
    for f in &report.kernel_families {
        let status = match &f.unsupported_because {
            None => "runs here".to_string(),
            Some(reason) => format!("not here: {reason}"),
        };
        println!(
            "  {:<10} workgroup {:>3}, workgroup memory {:<5}  {status}",
            f.name, f.workgroup_size, f.workgroup_memory
        );
    }
    println!();
    if let Some(forced) = report.forced {
        println!("kernels forced to {forced} by SURF_KERNELS");
        return;
    }
    println!("measured choice per shape (microseconds per launch)");
    for t in &report.autotune {
        let timings: Vec<String> = t
            .timings_us
            .iter()
            .map(|(family, us)| format!("{family} {us:.0}"))
            .collect();
        println!(
            "  {:<9} rows {:>4} k {:>5} n {:>5}  -> {:<9}  {}",
            format!("{:?}", t.shape.op).to_lowercase(),
            t.shape.rows,
            t.shape.k,
            t.shape.n,
            t.family.name(),
            timings.join(", ")
        );
    }
}
