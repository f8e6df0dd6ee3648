//! `cachegen bench`: size, speed and (optionally) model quality of every
//! level and of the baselines, all measured in one run on one input.

use std::path::PathBuf;
use std::process::Command;

use cachegen::codec::{self, calibrate_tables, Container, EncodeOptions, KvShape, KvTensors, Level, TableSet, Tables};
use cachegen::interchange;
use serde::Serialize;

use crate::baselines::{self, best_time};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Print one JSON object with a `rows` array instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure model quality (KL, top-1, perplexity) with the evaluator.
    #[arg(long)]
    quality: bool,
    /// Evaluator script (needs the model harness: scripts/model/setup_env.sh).
    #[arg(long, default_value = "scripts/model/evaluate.py")]
    evaluator: PathBuf,
    /// Python interpreter for the evaluator.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Chunk size for the chunked rows and the LMCache baseline.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
    /// Another KV file (another text) to calibrate model-level tables on;
    /// adds rows for chunks that reference those tables by id.
    #[arg(long)]
    tables_from: Option<PathBuf>,
    /// The model's sensitivity profile (per-layer step multipliers), used by every cachegen row.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Timed repetitions (the best is kept).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Only the whole-input codec rows and the constriction reference (a
    /// short speed check; sizes and speeds of those rows as in a full run).
    #[arg(long)]
    quick: bool,
    /// Threads for the multi-core rows (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    input: PathBuf,
}

#[derive(Serialize, Default, Clone)]
struct Row {
    method: String,
    level: Option<u8>,
    /// Tokens per encoded chunk (the whole input when equal to its length).
    chunk_tokens: usize,
    bits_per_element: f64,
    ratio_vs_fp16: f64,
    /// Bits per element of the probability tables inside the streams.
    table_bits_per_element: Option<f64>,
    /// Bits per element of the scales.
    scale_bits_per_element: Option<f64>,
    encode_gsym_s: Option<f64>,
    decode_gsym_s: Option<f64>,
    encode_gb_s_fp16: Option<f64>,
    decode_gb_s_fp16: Option<f64>,
    encode_mt_gsym_s: Option<f64>,
    decode_mt_gsym_s: Option<f64>,
    threads: Option<usize>,
    kl_mean: Option<f64>,
    kl_max: Option<f64>,
    top1_agreement: Option<f64>,
    ppl_increase_pct: Option<f64>,
    note: Option<String>,
    #[serde(skip)]
    decoded: Option<KvTensors>,
}

fn gsym(elems: usize, s: Option<f64>) -> Option<f64> {
    s.map(|s| elems as f64 / s / 1e9)
}

pub fn split_chunks(kv: &KvTensors, chunk: usize) -> Vec<KvTensors> {
    let s = kv.shape;
    let row = s.channels() * kv.dtype.size();
    (0..s.tokens)
        .step_by(chunk)
        .map(|t0| {
            let t1 = (t0 + chunk).min(s.tokens);
            KvTensors { shape: KvShape { tokens: t1 - t0, ..s }, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[t0 * row..t1 * row].to_vec()).collect() }
        })
        .collect()
}

fn join_chunks(parts: &[KvTensors]) -> KvTensors {
    let s = parts[0].shape;
    let tokens = parts.iter().map(|p| p.shape.tokens).sum();
    let tensors = (0..s.tensors()).map(|i| parts.iter().flat_map(|p| p.tensors[i].iter().copied()).collect()).collect();
    KvTensors { shape: KvShape { tokens, ..s }, dtype: parts[0].dtype, tensors }
}

/// Run `f` on every item with `threads` workers; returns wall seconds.
fn parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> (f64, Vec<R>) {
    let t = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                slots.lock().unwrap()[i] = Some(r);
            });
        }
    });
    (t.elapsed().as_secs_f64(), results.into_iter().map(|r| r.unwrap()).collect())
}

/// Progress goes to stderr, so `--json` output stays clean.
fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let loaded = crate::load_kv(&args.input)?;
    let kv = loaded.kv;
    let profile = crate::load_profile(args.profile.as_deref(), &kv.shape)?;
    let level_opts = |level: Level| EncodeOptions { level: Some(level), profile: profile.clone(), ..Default::default() };
    let elems = kv.shape.elems();
    let fp16_bytes = 2.0 * elems as f64;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let repeat = args.repeat;
    let mut rows: Vec<Row> = Vec::new();
    let size_row = |method: &str, level: Option<u8>, chunk: usize, bytes: usize| Row {
        method: method.into(),
        level,
        chunk_tokens: chunk,
        bits_per_element: 8.0 * bytes as f64 / elems as f64,
        ratio_vs_fp16: fp16_bytes / bytes as f64,
        ..Default::default()
    };

    rows.push(Row { note: Some("uncompressed fp16".into()), ..size_row("fp16", None, kv.shape.tokens, elems * 2) });

    // The codec, whole input as one chunk (self-contained .cg, as the CLI writes).
    for level in Level::ALL {
        progress(&format!("cachegen level {} ({}), whole input", level.number(), level.name()));
        let opts = level_opts(level);
        let (enc_s, bytes) = best_time(repeat, || codec::encode(&kv, &opts));
        let bytes = bytes.map_err(|e| e.to_string())?;
        let (dec_s, decoded) = best_time(repeat, || codec::decode(&bytes, None));
        let decoded = decoded.map_err(|e| e.to_string())?;
        if level == Level::Lossless && decoded != kv {
            return Err("lossless level did not round-trip exactly".into());
        }
        // Multi-core decode: tensors are independent.
        let container = Container::parse(&bytes, None, Default::default()).map_err(|e| e.to_string())?;
        let idx: Vec<usize> = (0..kv.shape.tensors()).collect();
        let (mt_s, _) = best_time(repeat, || {
            parallel(&idx, threads, |&i| {
                let mut out = vec![0u8; container.tensor_bytes()];
                container.decode_tensor(i, &mut out).map(|_| out)
            })
        });
        if args.quick {
            // Robust on a busy machine: the best of many runs of each piece
            // (parse, then each tensor into a preallocated buffer), summed.
            let n = repeat.max(20);
            let parse_s = best_time(n, || Container::parse(&bytes, None, Default::default()).map(|_| ())).0;
            let mut out = vec![0u8; container.tensor_bytes()];
            let tensors_s: f64 = idx.iter().map(|&i| best_time(n, || container.decode_tensor(i, &mut out)).0).sum();
            let encode_s = best_time(n, || codec::encode(&kv, &opts)).0;
            progress(&format!(
                "level {}: parse {:.2} ms, tensors {:.2} ms ({:.3} Gsym/s without parse and output allocation); encode {:.2} ms ({:.3} Gsym/s)",
                level.number(),
                parse_s * 1e3,
                tensors_s * 1e3,
                elems as f64 / tensors_s / 1e9,
                encode_s * 1e3,
                elems as f64 / encode_s / 1e9
            ));
        }
        let sizes = container.section_sizes();
        rows.push(Row {
            table_bits_per_element: Some(8.0 * sizes.tables as f64 / elems as f64),
            scale_bits_per_element: Some(8.0 * sizes.scales as f64 / elems as f64),
            encode_gsym_s: gsym(elems, Some(enc_s)),
            decode_gsym_s: gsym(elems, Some(dec_s)),
            encode_gb_s_fp16: gsym(elems, Some(enc_s)).map(|g| 2.0 * g),
            decode_gb_s_fp16: gsym(elems, Some(dec_s)).map(|g| 2.0 * g),
            decode_mt_gsym_s: gsym(elems, Some(mt_s)),
            threads: Some(threads),
            decoded: Some(decoded),
            note: Some("self-contained stream, tables embedded".into()),
            ..size_row("cachegen", Some(level.number()), kv.shape.tokens, bytes.len())
        });
    }

    // The codec on engine-sized chunks, tables embedded per chunk; the
    // multi-core rows encode and decode chunks in parallel.
    let chunks = split_chunks(&kv, args.chunk_tokens);
    for level in Level::ALL.into_iter().filter(|_| !args.quick) {
        progress(&format!("cachegen level {}, {}-token chunks", level.number(), args.chunk_tokens));
        let opts = level_opts(level);
        let (enc_s, encoded) = best_time(repeat, || parallel(&chunks, threads, |c| codec::encode(c, &opts).expect("encode")));
        let (dec_s, decoded) = best_time(repeat, || parallel(&encoded.1, threads, |b| codec::decode(b, None).expect("decode")));
        let bytes: usize = encoded.1.iter().map(|b| b.len()).sum();
        let tables: usize = encoded.1.iter().map(|b| Container::parse(b, None, Default::default()).unwrap().section_sizes().tables).sum();
        let scales: usize = encoded.1.iter().map(|b| Container::parse(b, None, Default::default()).unwrap().section_sizes().scales).sum();
        rows.push(Row {
            table_bits_per_element: Some(8.0 * tables as f64 / elems as f64),
            scale_bits_per_element: Some(8.0 * scales as f64 / elems as f64),
            encode_mt_gsym_s: gsym(elems, Some(enc_s)),
            decode_mt_gsym_s: gsym(elems, Some(dec_s)),
            threads: Some(threads),
            decoded: Some(join_chunks(&decoded.1)),
            note: Some("per-chunk streams, tables embedded in each".into()),
            ..size_row("cachegen-chunked", Some(level.number()), args.chunk_tokens, bytes)
        });
    }

    // Model-level tables calibrated on another text, referenced by id.
    if let Some(path) = &args.tables_from {
        let calib = crate::load_kv(path)?.kv;
        let calib_chunks = split_chunks(&calib, args.chunk_tokens);
        for level in [Level::Compact, Level::Default, Level::High] {
            progress(&format!("cachegen level {}, chunks with model tables from {}", level.number(), path.display()));
            let refs: Vec<&KvTensors> = calib_chunks.iter().filter(|c| c.shape.tokens == args.chunk_tokens).collect();
            let set: TableSet = calibrate_tables(&refs, &level_opts(level)).map_err(|e| e.to_string())?;
            let opts = EncodeOptions { tables: Tables::External(&set), ..level_opts(level) };
            let (mut bytes, mut patches) = (0, 0);
            for c in &chunks {
                // Channels the calibrated tables cannot code carry patches.
                let b = codec::encode(c, &opts).map_err(|e| e.to_string())?;
                let container = Container::parse(&b, Some(&set), Default::default()).map_err(|e| e.to_string())?;
                if container.decode().map_err(|e| e.to_string())? != codec::decode(&codec::encode(c, &level_opts(level)).unwrap(), None).unwrap() {
                    return Err("model-table stream decodes differently from the embedded-table stream".into());
                }
                patches += container.section_sizes().tables;
                bytes += b.len();
            }
            rows.push(Row {
                table_bits_per_element: Some(8.0 * patches as f64 / elems as f64),
                note: Some(format!("per-chunk streams referencing a table set calibrated on {} ({} bytes, stored once per namespace)", path.display(), set.to_bytes().len())),
                ..size_row("cachegen-chunked-model-tables", Some(level.number()), args.chunk_tokens, bytes)
            });
        }
    }

    progress("baselines: int8, LMCache-style CacheGen, zstd, constriction");
    if !args.quick {
        baselines_row(&kv, &args, &mut rows, &size_row);
    }
    let symbols = codec::encode::plane_symbols_for(&kv, &level_opts(Level::Default)).map_err(|e| e.to_string())?;
    let cr = baselines::constriction_reference(&kv.shape, &symbols, repeat);
    rows.push(Row {
        encode_gsym_s: gsym(elems, Some(cr.encode_s)),
        decode_gsym_s: gsym(elems, Some(cr.decode_s)),
        note: Some(format!(
            "default-level symbols, one ANS stream, exact per-channel 12-bit tables (not counted); empirical entropy {:.4} bits/element",
            cr.entropy_bits / elems as f64
        )),
        ..size_row("constriction-reference", Some(Level::Default.number()), kv.shape.tokens, cr.payload_bytes)
    });

    if args.quality {
        evaluate(&args, &loaded.metadata, &mut rows)?;
    }

    if args.json {
        let out = serde_json::json!({
            "input": args.input.display().to_string(),
            "layers": kv.shape.layers, "tokens": kv.shape.tokens, "kv_heads": kv.shape.heads, "head_dim": kv.shape.head_dim,
            "dtype": kv.dtype.name(), "elements": elems, "threads": threads,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    } else {
        print_table(&rows);
    }
    Ok(())
}

/// A size-only row: (method, level, chunk tokens, bytes).
type SizeRow<'a> = dyn Fn(&str, Option<u8>, usize, usize) -> Row + 'a;

/// The int8, LMCache-style and zstd baselines (skipped by `--quick`).
fn baselines_row(kv: &KvTensors, args: &BenchArgs, rows: &mut Vec<Row>, size_row: &SizeRow<'_>) {
    let elems = kv.shape.elems();
    let repeat = args.repeat;
    let int8 = baselines::int8_absmax(kv, repeat);
    rows.push(Row {
        encode_gsym_s: gsym(elems, int8.encode_s),
        decode_gsym_s: gsym(elems, int8.decode_s),
        decoded: int8.decoded,
        note: Some("int8, per-(layer, token) absmax, fp16 scales".into()),
        ..size_row("int8-absmax", None, kv.shape.tokens, int8.bytes)
    });
    let lm = baselines::lmcache(kv, args.chunk_tokens);
    rows.push(Row {
        decoded: lm.decoded,
        note: Some("LMCache CacheGen serde: per-token absmax, 32/16 bins, per-chunk 16-bit CDFs; size from exact code lengths".into()),
        ..size_row("lmcache-cachegen", None, args.chunk_tokens, lm.bytes)
    });
    for zl in [3, 19] {
        let z = baselines::zstd_fp16(kv, zl, repeat.min(2));
        rows.push(Row {
            encode_gsym_s: gsym(elems, z.encode_s),
            decode_gsym_s: gsym(elems, z.decode_s),
            note: Some(format!("zstd -{zl} on the fp16 bytes (lossless)")),
            ..size_row(&format!("zstd-{zl}"), None, kv.shape.tokens, z.bytes)
        });
    }
}

/// Write every reconstruction to a temporary directory and run the
/// evaluator once on all of them (it loads the model once).
fn evaluate(args: &BenchArgs, metadata: &std::collections::HashMap<String, String>, rows: &mut [Row]) -> Result<(), String> {
    if !metadata.contains_key("context_tokens") {
        return Err(format!("{} has no context_tokens metadata: quality needs a file written by scripts/model/make_kv.py", args.input.display()));
    }
    let dir = std::env::temp_dir().join(format!("cachegen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if let Some(kv) = &r.decoded {
            let p = dir.join(format!("row{i}.safetensors"));
            std::fs::write(&p, interchange::to_safetensors(kv, None).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            files.push((i, p));
        }
    }
    progress(&format!("evaluating {} reconstructions with the model", files.len()));
    let out = Command::new(&args.python)
        .arg(&args.evaluator)
        .arg(&args.input)
        .args(files.iter().map(|(_, p)| p))
        .arg("--json")
        .output()
        .map_err(|e| format!("cannot run {} {}: {e} (run scripts/model/setup_env.sh first)", args.python.display(), args.evaluator.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(format!("evaluator failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("evaluator output is not JSON: {e}"))?;
    let list = v.as_array().cloned().unwrap_or_else(|| vec![v]);
    if list.len() != files.len() {
        return Err("evaluator returned a different number of results".into());
    }
    for ((i, _), q) in files.iter().zip(list) {
        rows[*i].kl_mean = q["kl_mean"].as_f64();
        rows[*i].kl_max = q["kl_max"].as_f64();
        rows[*i].top1_agreement = q["top1_agreement"].as_f64();
        rows[*i].ppl_increase_pct = q["ppl_increase_pct"].as_f64();
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let f = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<30} {:>5} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "method", "level", "chunk", "bits/el", "x fp16", "tbl b", "scl b", "enc G/s", "dec G/s", "enc mt", "dec mt", "KL", "top1", "ppl %"
    );
    for r in rows {
        println!(
            "{:<30} {:>5} {:>6} {:>8.3} {:>7.2} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
            r.method,
            r.level.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            r.chunk_tokens,
            r.bits_per_element,
            r.ratio_vs_fp16,
            f(r.table_bits_per_element, 3),
            f(r.scale_bits_per_element, 3),
            f(r.encode_gsym_s, 3),
            f(r.decode_gsym_s, 3),
            f(r.encode_mt_gsym_s, 3),
            f(r.decode_mt_gsym_s, 3),
            f(r.kl_mean, 5),
            f(r.top1_agreement, 3),
            f(r.ppl_increase_pct, 2)
        );
    }
}
