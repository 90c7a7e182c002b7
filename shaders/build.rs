//! Expands the `matmul_subgroups.wgsl` template into one WGSL source per tile
//! height, written to `OUT_DIR/matmul_subgroups_<rows>.wgsl`.
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
}
