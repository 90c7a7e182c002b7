//! Every kernel the engine can build, translated by naga (the translator wgpu
//! runs) to the shading languages of wgpu's other backends: Metal (MSL), D3D12
//! (HLSL) and Vulkan (SPIR-V). The kernels only ever run on Vulkan here; a
//! construct that Metal's or D3D's writer rejects, or a capability that
//! backend lacks, fails this test instead of a user's device. No GPU needed.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ShaderStages, SubgroupOperationSet, Validator};
use surf_engine::kernels::sources::{KernelSource, every_source};

/// What a kernel needs from naga's validator, by the features and downlevel
/// capabilities it asks of the device (wgpu maps them the same way).
fn needed_capabilities(kernel: &KernelSource) -> Capabilities {
    let mut needed = Capabilities::empty();
    if kernel.features.contains(wgpu::Features::SUBGROUP) {
        needed |= Capabilities::SUBGROUP;
    }
    if kernel.features.contains(wgpu::Features::SHADER_F16) {
        needed |= Capabilities::SHADER_FLOAT16;
    }
    if kernel
        .downlevel
        .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32)
    {
        needed |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    needed
}

/// Validates `module` with only the capabilities that `kernel` needs and
/// `backend` offers, so a kernel that needs more than a backend has fails.
fn validate(
    kernel: &KernelSource,
    module: &naga::Module,
    backend: &str,
    offered: Capabilities,
) -> ModuleInfo {
    let needed = needed_capabilities(kernel);
    assert!(
        offered.contains(needed),
        "{}: needs {:?}, which {backend} lacks",
        kernel.name,
        needed - offered
    );
    Validator::new(naga::valid::ValidationFlags::all(), needed)
        .subgroup_stages(ShaderStages::COMPUTE)
        .subgroup_operations(SubgroupOperationSet::all())
        .validate(module)
        .unwrap_or_else(|e| panic!("{}: naga rejects it for {backend}: {e:?}", kernel.name))
}

fn parse(kernel: &KernelSource) -> naga::Module {
    naga::front::wgsl::parse_str(&kernel.text).unwrap_or_else(|e| {
        panic!(
            "{}: {}",
            kernel.name,
            e.emit_to_string_with_path(&kernel.text, &kernel.name)
        )
    })
}

#[test]
fn every_kernel_translates_to_msl_hlsl_and_spirv() {
    let kernels = every_source();
    assert!(!kernels.is_empty());
    for kernel in &kernels {
        let module = parse(kernel);
        let uses_f16 = kernel.features.contains(wgpu::Features::SHADER_F16);

        // Metal: MSL 2.4 (macOS 12, iOS 15), which has SIMD-group functions.
        let info = validate(kernel, &module, "Metal", msl::supported_capabilities());
        let options = msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let pipeline = msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, "main".into())),
            ..Default::default()
        };
        let (text, _) = msl::write_string(&module, &info, &options, &pipeline)
            .unwrap_or_else(|e| panic!("{}: the MSL writer fails: {e:?}", kernel.name));
        assert!(text.contains("kernel void"), "{}", kernel.name);

        // D3D12: shader model 6.0 has wave operations, 6.2 16-bit types.
        let info = validate(kernel, &module, "D3D12", hlsl::supported_capabilities());
        let options = hlsl::Options {
            shader_model: if uses_f16 {
                hlsl::ShaderModel::V6_2
            } else {
                hlsl::ShaderModel::V6_0
            },
            ..Default::default()
        };
        let mut text = String::new();
        hlsl::Writer::new(&mut text, &options, &hlsl::PipelineOptions::default())
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{}: the HLSL writer fails: {e:?}", kernel.name));
        assert!(text.contains("[numthreads("), "{}", kernel.name);

        // Vulkan: SPIR-V 1.3 (Vulkan 1.1), the first with subgroup operations.
        let info = validate(kernel, &module, "Vulkan", spv::supported_capabilities());
        let options = spv::Options {
            lang_version: (1, 3),
            ..Default::default()
        };
        let pipeline = spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: "main".into(),
        };
        let words = spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{}: the SPIR-V writer fails: {e:?}", kernel.name));
        assert_eq!(words.first(), Some(&0x0723_0203), "{}", kernel.name);
    }
}
