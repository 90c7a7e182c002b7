//! Expands the `matmul_subgroups.wgsl` template into one WGSL source per tile
//! height, written to `OUT_DIR/matmul_subgroups_<rows>.wgsl`, and writes the
//! subgroup attention kernel once per supported head size, to
//! `OUT_DIR/attention_subgroups_<head_dim>.wgsl`.
//!
//! WGSL has no preprocessor, and subgroupBroadcast wants a constant lane index,
//! so every row of a tile must be spelled out. The template keeps one copy of
//! each unrolled line with a marker saying what it repeats over; the markers
//! are described at the top of the template.

use std::path::Path;

const TEMPLATE: &str = "matmul_subgroups.wgsl";

/// Tile heights to generate. `src/lib.rs` includes one file per entry.
const TILE_ROWS: [u32; 4] = [16, 32, 64, 128];

/// One subgroup loads, then broadcasts, this many rows of A per vec4 load.
const LANES: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Once,
    PerBlock,
    PerRow,
}

/// What a line repeats over, and the line without its marker.
fn marker(line: &str) -> (Repeat, &str) {
    let trimmed = line.trim_end();
    for (suffix, repeat) in [("// @block", Repeat::PerBlock), ("// @row", Repeat::PerRow)] {
        if let Some(code) = trimmed.strip_suffix(suffix) {
            return (repeat, code.trim_end());
        }
    }
    (Repeat::Once, line)
}

/// Substitutes `{name}` placeholders in the code part of `line` (comments stay
/// as written) and rejects any placeholder the line's marker does not define,
/// so that a `{row}` on a per-block line fails the build instead of producing
/// WGSL that only naga would catch, later and less clearly.
fn substitute(line: &str, vars: &[(&str, u32)], line_no: usize) -> Result<String, String> {
    let (code, comment) = match line.find("//") {
        Some(at) => line.split_at(at),
        None => (line, ""),
    };
    let mut code = code.to_string();
    for (name, value) in vars {
        code = code.replace(&format!("{{{name}}}"), &value.to_string());
    }
    let mut rest = code.as_str();
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            return Err(format!(
                "{TEMPLATE}:{line_no}: placeholder {{{}}} is not defined on this line",
                &after[..name_len]
            ));
        }
        rest = after;
    }
    Ok(code + comment)
}

fn expand(template: &str, tile_m: u32) -> Result<String, String> {
    let lines: Vec<(Repeat, &str)> = template.lines().map(marker).collect();
    let mut out = format!(
        "// {TEMPLATE} expanded for TILE_M = {tile_m} by surf-shaders' build.rs; edit the template.\n\n"
    );
    let mut start = 0;
    while start < lines.len() {
        let repeat = lines[start].0;
        let mut end = start + 1;
        if repeat != Repeat::Once {
            while end < lines.len() && lines[end].0 == repeat {
                end += 1;
            }
        }
        let copies: Vec<Vec<(&str, u32)>> = match repeat {
            Repeat::Once => vec![vec![]],
            Repeat::PerBlock => (0..tile_m / LANES)
                .map(|block| vec![("block", block), ("block_row", block * LANES)])
                .collect(),
            Repeat::PerRow => (0..tile_m)
                .map(|row| vec![("row", row), ("block", row / LANES), ("lane", row % LANES)])
                .collect(),
        };
        for mut vars in copies {
            vars.push(("tile_m", tile_m));
            for (offset, (_, line)) in lines[start..end].iter().enumerate() {
                out += &substitute(line, &vars, start + offset + 1)?;
                out.push('\n');
            }
        }
        start = end;
    }
    Ok(out)
}

/// Head sizes with a subgroup attention kernel. `src/lib.rs` includes one file
/// per entry; other sizes run `attention.wgsl`.
const ATTENTION_HEAD_DIMS: [u32; 4] = [32, 64, 128, 256];

/// Queries per attention workgroup, one key per lane in the score phase.
const ATTENTION_QUERIES: u32 = 8;

/// The subgroup attention kernel for heads of `head_dim` (a multiple of 32).
///
/// One workgroup is one subgroup of 8 lanes and computes 8 queries of one head
/// of one sequence. Keys go through in blocks of 8, lane i holding key i of the
/// block: every lane scores all 8 queries against its own key, `subgroupMax`
/// and `subgroupAdd` give each query's running maximum and sum, and for the
/// weighted sum of values lane i owns the vec4 groups i, i + 8, ... of the head,
/// taking each key's probability by `subgroupBroadcast`. On a software
/// rasterizer, which loads memory one lane at a time, a block then costs each
/// lane 2 * head_dim / 4 + 1 loads for 8 queries, where a query per lane
/// reading keys from workgroup memory costs 2 * head_dim / 4 loads per key.
/// The queries, keys and accumulators are spelled out so that they stay in
/// registers and the broadcast lanes are constants.
fn attention_source(head_dim: u32) -> String {
    let dim4 = head_dim / 4;
    let groups = dim4 / LANES;
    let queries = ATTENTION_QUERIES;
    let mut s = format!(
        "// Generated by surf-shaders' build.rs for heads of {head_dim}; see `attention_source` there.\n\n"
    );
    s += "struct Params {\n    seq: u32,\n    head_dim: u32,\n    has_position_bias: u32,\n    scale: f32,\n    row_stride: u32,\n    key_offset: u32,\n    value_offset: u32,\n    out_stride: u32,\n    kv_group: u32,\n    window_before: u32,\n    window_after: u32,\n    _pad: u32,\n}\n\n";
    s += "@group(0) @binding(0) var<uniform> params: Params;\n";
    s += "// Rows of queries, then keys at key_offset and values at value_offset (see attention.wgsl).\n";
    s += "@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;\n";
    s += "@group(0) @binding(2) var<storage, read> mask: array<f32>;\n";
    s += "@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;\n";
    s += "// [heads, 2 * seq - 1] additive bias by relative position (key - query + seq - 1).\n";
    s += "@group(0) @binding(4) var<storage, read> position_bias: array<f32>;\n\n";
    s += "// The bias of a padding key, of a key outside the query's window, and of the lanes past the end of the sequence.\n";
    s += "const MASKED: f32 = -3.0e38;\n\n";
    s += "// Whether `query` sees `key` under the layer's window.\n";
    s += "fn visible(query: u32, key: u32) -> bool {\n    if (key < query) {\n        return query - key <= params.window_before;\n    }\n    return key - query <= params.window_after;\n}\n\n";
    s += "@compute @workgroup_size(8, 1, 1)\n";
    s += "fn main(\n    @builtin(workgroup_id) group: vec3<u32>,\n    @builtin(subgroup_invocation_id) lane: u32,\n) {\n";
    s += "    let seq = params.seq;\n    let last = seq - 1u;\n";
    s += "    let row_stride4 = params.row_stride / 4u;\n    let out_stride4 = params.out_stride / 4u;\n";
    s += &format!("    let head4 = group.y * {dim4}u;\n");
    s += &format!("    let kv_head4 = (group.y / params.kv_group) * {dim4}u;\n");
    s += "    let key4 = params.key_offset / 4u + kv_head4;\n    let value4 = params.value_offset / 4u + kv_head4;\n";
    s += "    let first_row = group.z * seq;\n";
    s += "    let bias_row = group.y * (2u * seq - 1u) + seq - 1u;\n";
    s += "    let has_position_bias = params.has_position_bias != 0u;\n";
    s += &format!("    let q0 = group.x * {queries}u;\n");
    s += "    // The keys some query of this workgroup sees.\n";
    s += &format!(
        "    let keys_begin = q0 - min(q0, params.window_before);\n    let keys_end = min(seq, min(q0 + {}u, last) + min(params.window_after, seq) + 1u);\n",
        queries - 1
    );
    s += "    // Every lane holds all the queries; rows past the end repeat the last one and are not stored.\n";
    for r in 0..queries {
        s += &format!(
            "    let qrow{r} = (first_row + min(q0 + {r}u, last)) * row_stride4 + head4;\n"
        );
        for d in 0..dim4 {
            s += &format!("    let q{r}_{d} = qkv[qrow{r} + {d}u] * params.scale;\n");
        }
        s += &format!("    var max{r} = MASKED;\n    var sum{r} = 0.0;\n");
        for g in 0..groups {
            s += &format!("    var acc{r}_{g} = vec4<f32>(0.0);\n");
        }
    }
    s += "\n    for (var k0 = keys_begin; k0 < keys_end; k0 += 8u) {\n";
    s += "        let key_index = k0 + lane;\n";
    s += "        var bias = MASKED;\n        if (key_index < seq) {\n            bias = mask[first_row + key_index];\n        }\n";
    s += "        let krow = (first_row + min(key_index, last)) * row_stride4 + key4;\n";
    for d in 0..dim4 {
        s += &format!("        let key{d} = qkv[krow + {d}u];\n");
    }
    for r in 0..queries {
        s += &format!("        var position{r} = 0.0;\n");
        s += &format!(
            "        if (has_position_bias && key_index < seq) {{\n            position{r} = position_bias[bias_row + key_index - min(q0 + {r}u, last)];\n        }}\n"
        );
        s += &format!("        var dot{r} = q{r}_0 * key0;\n");
        for d in 1..dim4 {
            s += &format!("        dot{r} = fma(q{r}_{d}, key{d}, dot{r});\n");
        }
        s += &format!(
            "        let score{r} = select(MASKED, dot{r}.x + dot{r}.y + dot{r}.z + dot{r}.w + bias + position{r}, key_index < keys_end && visible(min(q0 + {r}u, last), key_index));\n"
        );
        s += &format!("        let new_max{r} = max(max{r}, subgroupMax(score{r}));\n");
        s += &format!("        let correction{r} = exp(max{r} - new_max{r});\n");
        s += &format!("        let p{r} = exp(score{r} - new_max{r});\n");
        s += &format!("        sum{r} = sum{r} * correction{r} + subgroupAdd(p{r});\n");
        s += &format!("        max{r} = new_max{r};\n");
        for g in 0..groups {
            s += &format!("        acc{r}_{g} *= correction{r};\n");
        }
    }
    s += "        // Lane i takes vec4 groups i, i + 8, ... of each key's value.\n";
    for j in 0..LANES {
        s += &format!(
            "        let vrow{j} = (first_row + min(k0 + {j}u, last)) * row_stride4 + value4 + lane;\n"
        );
        for g in 0..groups {
            s += &format!("        let v{j}_{g} = qkv[vrow{j} + {}u];\n", g * LANES);
        }
        for r in 0..queries {
            s += &format!("        let w{j}_{r} = vec4<f32>(subgroupBroadcast(p{r}, {j}u));\n");
            for g in 0..groups {
                s += &format!("        acc{r}_{g} = fma(w{j}_{r}, v{j}_{g}, acc{r}_{g});\n");
            }
        }
    }
    s += "    }\n\n";
    for r in 0..queries {
        s += &format!("    if (q0 + {r}u < seq) {{\n");
        s += &format!(
            "        let base{r} = (first_row + q0 + {r}u) * out_stride4 + head4 + lane;\n"
        );
        for g in 0..groups {
            s += &format!(
                "        out[base{r} + {}u] = acc{r}_{g} / sum{r};\n",
                g * LANES
            );
        }
        s += "    }\n";
    }
    s += "}\n";
    s
}

fn main() {
    println!("cargo::rerun-if-changed={TEMPLATE}");
    println!("cargo::rerun-if-changed=build.rs");
    let template = std::fs::read_to_string(TEMPLATE)
        .unwrap_or_else(|e| panic!("reading the template {TEMPLATE}: {e}"));
    let out_dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    for tile_m in TILE_ROWS {
        assert!(
            tile_m.is_multiple_of(LANES),
            "a tile must hold whole 8-row blocks, not {tile_m} rows"
        );
        let source = expand(&template, tile_m).unwrap_or_else(|e| panic!("{e}"));
        let path = Path::new(&out_dir).join(format!("matmul_subgroups_{tile_m}.wgsl"));
        std::fs::write(&path, source).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    for head_dim in ATTENTION_HEAD_DIMS {
        assert!(
            head_dim.is_multiple_of(4 * LANES),
            "a head of {head_dim} does not split into vec4 groups over 8 lanes"
        );
        let path = Path::new(&out_dir).join(format!("attention_subgroups_{head_dim}.wgsl"));
        std::fs::write(&path, attention_source(head_dim))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
