//! `cachegen`: encode, decode, inspect and benchmark KV caches, and drive the
//! connector core end to end.

mod baselines;
mod bench;
mod connector_demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cachegen::codec::{self, Container, EncodeOptions, Level};
use cachegen::interchange;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cachegen", version, about = "CacheGen KV-cache codec: encode, decode, inspect, benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode a KV cache (safetensors: layers.{i}.key / layers.{i}.value) into a .cg stream.
    Encode {
        /// Quality level: 1/compact, 2/default, 3/high, 4/lossless.
        #[arg(long, default_value = "default")]
        level: String,
        /// The model's sensitivity profile (JSON with per-layer `key` and
        /// `value` step multipliers; see profiles/).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Reference this model-level table set (`cachegen calibrate`)
        /// instead of embedding tables: smaller, but no longer
        /// self-contained (decode needs the same set).
        #[arg(long)]
        tables: Option<PathBuf>,
        input: PathBuf,
        output: PathBuf,
    },
    /// Decode a .cg stream back to safetensors (same names, shapes and dtype).
    Decode {
        /// The table set a stream encoded with `--tables` references.
        #[arg(long)]
        tables: Option<PathBuf>,
        input: PathBuf,
        output: PathBuf,
    },
    /// Calibrate a model-level table set (.cgts, docs/FORMAT.md section 8)
    /// from KV caches of the model, for one level: chunks encoded with it
    /// carry no tables. Name it in the connector config's `tables`.
    Calibrate {
        /// Quality level: 1/compact, 2/default, 3/high.
        #[arg(long, default_value = "default")]
        level: String,
        /// The profile the chunks will be encoded with (the connector's `profile`).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Tokens per calibration sample: the connector's `chunk_tokens`
        /// (a shorter tail of an input is left out).
        #[arg(long, default_value_t = 256)]
        chunk_tokens: usize,
        /// Where to write the set.
        #[arg(long, short)]
        output: PathBuf,
        /// KV caches of the model (safetensors), all of one shape per token and dtype.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Print a JSON summary of a .cg stream's header and section sizes.
    Inspect { input: PathBuf },
    /// Measure size, speed (and quality, with the model harness) against baselines.
    Bench(bench::BenchArgs),
    /// Drive the connector core end to end on a KV file: store it through the
    /// tiers from paged blocks, look it up and stream-load it from a fresh
    /// context into another layout, and verify the bytes.
    Connector(connector_demo::ConnectorArgs),
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn load_kv(path: &Path) -> Result<interchange::Loaded, String> {
    interchange::from_safetensors(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// Per-tensor multipliers from a profile file, checked against the cache's shape.
pub fn load_profile(path: Option<&Path>, shape: &codec::KvShape) -> Result<Option<Vec<f32>>, String> {
    let Some(path) = path else { return Ok(None) };
    let text = String::from_utf8(read(path)?).map_err(|_| format!("{}: not UTF-8 JSON", path.display()))?;
    let p = cachegen::profile::Profile::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    p.multipliers(shape).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_set(path: Option<&Path>) -> Result<Option<codec::TableSet>, String> {
    let Some(path) = path else { return Ok(None) };
    codec::TableSet::from_bytes(&read(path)?).map(Some).map_err(|e| format!("{}: not a table set: {e}", path.display()))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Encode { level, profile, tables, input, output } => {
            let level = Level::parse(&level).map_err(|e| e.to_string())?;
            let kv = load_kv(&input)?.kv;
            let set = load_set(tables.as_deref())?;
            let tables = match &set {
                Some(s) => codec::Tables::External(s),
                None => codec::Tables::Embedded,
            };
            let opts = EncodeOptions { level: Some(level), profile: load_profile(profile.as_deref(), &kv.shape)?, tables, ..Default::default() };
            let bytes = codec::encode(&kv, &opts).map_err(|e| format!("{}: {e}", input.display()))?;
            write(&output, &bytes)?;
            let raw = kv.shape.elems() * 2;
            eprintln!(
                "{}: {} bytes -> {} bytes ({:.2} bits/element, {:.2}x vs fp16), level {}",
                input.display(),
                kv.shape.elems() * kv.dtype.size(),
                bytes.len(),
                8.0 * bytes.len() as f64 / kv.shape.elems() as f64,
                raw as f64 / bytes.len() as f64,
                level.name()
            );
            Ok(())
        }
        Command::Decode { tables, input, output } => {
            let bytes = read(&input)?;
            let set = load_set(tables.as_deref())?;
            let kv = codec::decode(&bytes, set.as_ref()).map_err(|e| format!("{}: {e}", input.display()))?;
            let st = interchange::to_safetensors(&kv, None).map_err(|e| e.to_string())?;
            write(&output, &st)
        }
        Command::Calibrate { level, profile, chunk_tokens, output, inputs } => {
            let level = Level::parse(&level).map_err(|e| e.to_string())?;
            if level == Level::Lossless {
                return Err("the lossless level codes raw bytes and takes no table set".into());
            }
            if chunk_tokens == 0 {
                return Err("--chunk-tokens must be positive".into());
            }
            let mut samples = Vec::new();
            for path in &inputs {
                let kv = load_kv(path)?.kv;
                let before = samples.len();
                samples.extend(bench::split_chunks(&kv, chunk_tokens).into_iter().filter(|c| c.shape.tokens == chunk_tokens));
                if samples.len() == before {
                    return Err(format!("{}: {} tokens, fewer than one {chunk_tokens}-token sample", path.display(), kv.shape.tokens));
                }
            }
            let opts = EncodeOptions { level: Some(level), profile: load_profile(profile.as_deref(), &samples[0].shape)?, ..Default::default() };
            let refs: Vec<&codec::KvTensors> = samples.iter().collect();
            let set = codec::calibrate_tables(&refs, &opts).map_err(|e| e.to_string())?;
            let bytes = set.to_bytes();
            write(&output, &bytes)?;
            eprintln!(
                "{}: table set {:016x} for level {}, {} channels, {} planes, from {} samples of {chunk_tokens} tokens ({} bytes)",
                output.display(),
                set.id(),
                level.name(),
                set.channels,
                set.plan.len(),
                samples.len(),
                bytes.len()
            );
            Ok(())
        }
        Command::Inspect { input } => {
            let bytes = read(&input)?;
            let c = Container::parse(&bytes, None, Default::default());
            // A stream with external tables can still be inspected without them.
            let c = match c {
                Err(codec::Error::MissingTables(_)) => None,
                other => Some(other.map_err(|e| format!("{}: {e}", input.display()))?),
            };
            let layout = codec::format::parse(&bytes, u64::MAX).map_err(|e| format!("{}: {e}", input.display()))?;
            println!("{}", serde_json::to_string_pretty(&inspect_json(&layout, c.as_ref(), bytes.len())).unwrap());
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Connector(args) => connector_demo::run(args),
    }
}

fn inspect_json(layout: &codec::format::Layout, c: Option<&Container>, total: usize) -> serde_json::Value {
    use codec::format::PlaneKind;
    let h = &layout.header;
    let planes: Vec<serde_json::Value> = layout
        .planes
        .iter()
        .map(|p| match p {
            PlaneKind::Quantized(q) => serde_json::json!({"kind": "quantized", "scale_group": format!("{:?}", q.group), "asymmetric": q.asymmetric, "symbols": q.nsym()}),
            PlaneKind::Raw { index, shared } => serde_json::json!({"kind": "raw_byte", "byte": index, "shared_table": shared}),
        })
        .collect();
    let elems = h.shape.elems() as f64;
    serde_json::json!({
        "format_version": codec::format::VERSION,
        "dtype": h.dtype.name(),
        "kind": format!("{:?}", h.shape.kind),
        "layers": h.shape.layers,
        "tokens": h.shape.tokens,
        "kv_heads": h.shape.heads,
        "head_dim": h.shape.head_dim,
        "level": h.level,
        "level_name": Level::from_number(h.level).map(|l| l.name()),
        "prob_bits": h.prob_bits,
        "tables": if h.external_tables() { "external" } else { "embedded" },
        "table_id": format!("{:016x}", h.table_id),
        "segment_tokens": h.seg_tokens,
        "segment_groups": h.seg_groups,
        "segments": h.segments,
        "exact_tokens": layout.exact_tokens,
        "planes": planes,
        "bytes": c.map(|c| serde_json::to_value(c.section_sizes()).unwrap()),
        "total_bytes": total,
        "bits_per_element": 8.0 * total as f64 / elems,
        "ratio_vs_fp16": 2.0 * elems / total as f64,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cachegen: error: {e}");
            ExitCode::FAILURE
        }
    }
}
