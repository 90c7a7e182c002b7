//! Turns the figures the benches leave in `bench-out/` into `BENCHMARKS.md`
//! and a PNG plot of throughput against the VRAM budget.
//!
//! `bench-report --out BENCHMARKS.md --plot benches/plots/paging.png DIR...`
//! writes one section per DIR (one machine's `bench-out/`), in the order given.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

/// The benches in the order the report shows them, with a title and what a
/// reader should know to read the figures.
const SECTIONS: [(&str, &str, &str); 6] = [
    (
        "kernels",
        "Kernels",
        "GFLOP/s of each kernel at the model's shapes, next to the adapter's FMA \
         peak measured in the same run. `families`: every kernel family at every \
         shape of MiniLM's layer (LayerNorm in GB/s), the family that ran every \
         shape before kernels were measured (`fixed`), the one the engine's \
         measuring picks in the same run (`autotuned`), and the ratio of their rates.",
    ),
    (
        "embed",
        "End to end: embeddings per second, against candle on the CPU",
        "all-MiniLM-L6-v2 on the same inputs and model files. `ratio` is ours over \
         candle's CPU BERT in the same process; above 1 we are faster.",
    ),
    (
        "transport",
        "Transport",
        "MB/s over QUIC on loopback: a bare quinn stream, and the weight server \
         with hashing, to one client and to eight at once; then one client through \
         a regional server (no model and no cache of its own) with its shared Redis \
         warm and emptied before each round, next to the origin directly.",
    ),
    (
        "streaming",
        "Streaming all-MiniLM-L6-v2",
        "Compute only (every layer resident), fetch only (fetch, check, pack and \
         upload every layer, no compute) and cold streamed; then throughput with \
         the host cache warm under budgets of 1, 2, 3 and 6 layers.",
    ),
    (
        "paging",
        "Paging a model larger than the budget",
        "A random-weight model from the synthetic generator, served over QUIC on \
         loopback, under VRAM budgets given in layers, with eviction by next use \
         (`optimal`, the default) and by `lru`, then with f16 weights under the same \
         MiB budgets (`budget_layers` is then the slots they hold). The host cache \
         holds the whole model, so the budget alone limits. `bound_mb_per_pass` is \
         what next-use eviction promises: N - k + d + 1 layers a pass.",
    ),
    (
        "http",
        "HTTP service: embeddings per second and latency",
        "`POST /embed` on loopback, one short input a request, from closed-loop \
         clients at each concurrency; `inputs_per_batch` is what the queue merged. \
         `in_process` is `Engine::infer` on the same inputs and engine in the same \
         run. The two ratios hold HTTP throughput at concurrency 32 to one call on \
         32 texts, and HTTP p50 at concurrency 1 to one call on one text. \
         `rerank` and `rerank_http`: a BERT cross-encoder of MiniLM's shape (random \
         weights, one label) scoring 20 passages a call through `Engine::rerank` \
         and 20 a request through `POST /rerank`, in pairs per second.",
    ),
];

struct Args {
    out: PathBuf,
    plot: PathBuf,
    dirs: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut out = PathBuf::from("BENCHMARKS.md");
    let mut plot = PathBuf::from("benches/plots/paging.png");
    let mut dirs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().ok_or("--out needs a file")?.into(),
            "--plot" => plot = args.next().ok_or("--plot needs a file")?.into(),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            dir => dirs.push(PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        return Err("name at least one folder of bench figures (bench-out)".into());
    }
    Ok(Args { out, plot, dirs })
}

fn read_json(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn cell(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => {
                if x.abs() >= 100.0 {
                    format!("{x:.0}")
                } else if x.abs() >= 1.0 {
                    format!("{x:.2}")
                } else {
                    format!("{x:.3}")
                }
            }
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An array of objects as a markdown table, columns in first-seen order.
fn table(rows: &[Value], out: &mut String) {
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        if let Value::Object(map) = row {
            for key in map.keys() {
                if !columns.contains(&key.as_str()) {
                    columns.push(key);
                }
            }
        }
    }
    if columns.is_empty() {
        return;
    }
    let _ = writeln!(out, "| {} |", columns.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(columns.len()));
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| row.get(*c).map(cell).unwrap_or_default())
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push('\n');
}

/// Scalars as a list, nested objects flattened with dotted names, arrays of
/// objects as tables after it.
fn figures(value: &Value, out: &mut String) {
    let Value::Object(map) = value else {
        return;
    };
    let mut tables = Vec::new();
    fn scalars(prefix: &str, map: &serde_json::Map<String, Value>, out: &mut String) {
        for (key, value) in map {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                Value::Object(inner) => scalars(&name, inner, out),
                Value::Array(_) => {}
                _ => {
                    let _ = writeln!(out, "- {name}: {}", cell(value));
                }
            }
        }
    }
    scalars("", map, out);
    out.push('\n');
    for (key, value) in map {
        if let Value::Array(rows) = value
            && rows.iter().all(Value::is_object)
            && !rows.is_empty()
        {
            tables.push((key, rows));
        }
    }
    for (key, rows) in tables {
        let _ = writeln!(out, "{key}:\n");
        table(rows, out);
    }
}

/// One line of the plot: "machine, policy", (budget MB, embeddings/s)
/// points and the machine's fully resident rate.
type Series = (String, Vec<(f64, f64)>, f64);

/// Throughput against the budget, one line per machine, eviction policy and
/// weight dtype, with each machine's fully resident rate (per dtype) as a
/// dashed line.
fn plot(runs: &[(String, Value)], path: &Path) -> Result<(), String> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").map_err(|e| {
        format!("the plot needs DejaVu Sans (apt-get install fonts-dejavu-core): {e}")
    })?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| "DejaVuSans.ttf is not a font plotters can read".to_string())?;

    // One line per machine, eviction policy and weight dtype; rows from
    // before f16 existed are f32.
    let kind = |row: &Value| {
        (
            row["eviction"].as_str().unwrap_or("lru").to_string(),
            row["dtype"].as_str().unwrap_or("f32").to_string(),
        )
    };
    let series: Vec<Series> = runs
        .iter()
        .flat_map(|(label, paging)| {
            let rows = paging["budgets"].as_array().cloned().unwrap_or_default();
            let mut kinds: Vec<(String, String)> = Vec::new();
            for row in &rows {
                if !kinds.contains(&kind(row)) {
                    kinds.push(kind(row));
                }
            }
            kinds.into_iter().filter_map(move |(policy, dtype)| {
                let points = rows
                    .iter()
                    .filter(|row| kind(row) == (policy.clone(), dtype.clone()))
                    .filter_map(|row| Some((row["budget_mb"].as_f64()?, row["per_s"].as_f64()?)))
                    .collect::<Vec<_>>();
                let resident = match dtype.as_str() {
                    "f32" => paging["resident_per_s"].as_f64(),
                    other => paging[format!("resident_{other}_per_s")].as_f64(),
                };
                Some((format!("{label}, {policy}, {dtype}"), points, resident?))
            })
        })
        .filter(|(_, points, _)| !points.is_empty())
        .collect();
    if series.is_empty() {
        return Err("no paging figures to plot".into());
    }
    let model = &runs[0].1["model"];
    let x_max = series
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        * 1.05;
    let y_max = series
        .iter()
        .flat_map(|(_, points, resident)| points.iter().map(|p| p.1).chain([*resident]))
        .fold(0.0, f64::max)
        * 1.15;

    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let (width, height) = (900u32, 560u32);
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let caption = format!(
            "{} ({} layers, {:.0} MB): throughput against the VRAM budget",
            model["name"].as_str().unwrap_or("model"),
            model["layers"],
            model["weights_mb"].as_f64().unwrap_or(0.0)
        );
        let draw = |e: DrawingAreaErrorKind<_>| format!("drawing the plot: {e}");
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("VRAM budget for weights (MB)")
            .y_desc("embeddings per second")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(draw)?;
        let colours = [BLUE, RED, GREEN, MAGENTA];
        let mut residents_drawn: Vec<f64> = Vec::new();
        for (i, (label, points, resident)) in series.iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(draw)?
                .label(format!("{label}: paged, host cache warm"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(draw)?;
            // Every policy of a machine shares its resident rate: draw it once.
            if residents_drawn.contains(resident) {
                continue;
            }
            residents_drawn.push(*resident);
            // "machine, policy, dtype" names the resident line "machine, dtype".
            let machine = match label.rsplitn(3, ", ").collect::<Vec<_>>()[..] {
                [dtype, _, machine] => format!("{machine}, {dtype}"),
                _ => label.clone(),
            };
            let dashes = (0..40).map(|k| {
                let x0 = x_max * k as f64 / 40.0;
                PathElement::new([(x0, *resident), (x0 + x_max / 80.0, *resident)], colour)
            });
            chart
                .draw_series(dashes)
                .map_err(draw)?
                .label(format!("{machine}: fully resident"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 8, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&pixels))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut report = String::from(
        "# Benchmarks\n\n\
         Regenerate with `bash benches/report.sh`: it runs every bench in release \
         and rewrites this file and the plot from the figures the benches leave in \
         `bench-out/`. Each section is one machine.\n\n",
    );
    let mut paging_runs = Vec::new();
    for dir in &args.dirs {
        let machine = read_json(&dir.join("machine.json"))?.unwrap_or(Value::Null);
        let adapter = ["streaming", "paging", "embed", "kernels", "http"]
            .iter()
            .find_map(|name| {
                read_json(&dir.join(format!("{name}.json")))
                    .ok()
                    .flatten()
                    .and_then(|v| v["adapter"].as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown adapter".into());
        let _ = writeln!(report, "## {adapter}\n");
        if let Value::Object(map) = &machine {
            for (key, value) in map {
                let _ = writeln!(report, "- {key}: {}", cell(value));
            }
            report.push('\n');
        }
        let mut found = false;
        for (name, title, about) in SECTIONS {
            let Some(figures_json) = read_json(&dir.join(format!("{name}.json")))? else {
                continue;
            };
            found = true;
            let _ = writeln!(report, "### {title}\n\n{about}\n");
            figures(&figures_json, &mut report);
            if name == "paging" {
                paging_runs.push((adapter.clone(), figures_json));
            }
        }
        if !found {
            return Err(format!("{} holds no bench figures", dir.display()));
        }
    }
    if !paging_runs.is_empty() {
        plot(&paging_runs, &args.plot)?;
        let relative = relative_path(&args.out, &args.plot);
        let _ = writeln!(
            report,
            "## Throughput against the VRAM budget\n\n![throughput against the VRAM budget]({relative})\n"
        );
        println!("plot written to {}", args.plot.display());
    }
    std::fs::write(&args.out, report).map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!("report written to {}", args.out.display());
    Ok(())
}

/// `plot` as the markdown file at `out` should link it.
fn relative_path(out: &Path, plot: &Path) -> String {
    let base = out.parent().unwrap_or(Path::new(""));
    plot.strip_prefix(base)
        .unwrap_or(plot)
        .display()
        .to_string()
}

fn main() {
    if let Err(message) = run() {
        eprintln!("bench-report: {message}");
        std::process::exit(2);
    }
}
