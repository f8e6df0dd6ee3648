//! The C ABI: argument checks, handles, status codes and panic catching, and
//! nothing else (every decision is made in [`crate::connector`]).
//!
//! Conventions (docs/ABI.md has the full reference):
//! - every function returns an `int32_t` status: `CG_OK` (0), `CG_PENDING`
//!   (1: not reached yet), or a negative `CG_ERR_*`; a failing call stores a
//!   message that `cg_last_error_message` returns on the same thread;
//! - handles (`cg_context`, `cg_layout`, `cg_job`) are opaque, created by a
//!   `*_new` or job-starting call through an out-pointer and released by the
//!   matching `*_free`;
//! - null pointers and bad values are errors, never crashes; no Rust panic
//!   crosses the boundary (it becomes `CG_ERR_INTERNAL`).

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)] // documented in docs/ABI.md and the header

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::codec::{Dtype, KvKind};
use crate::connector::{ConnectorError, Context};
use crate::gpu::GpuError;
use crate::layout::{KvLayout, Memory};
use crate::pipeline::{Job, JobKind, Stage};

/// Success.
pub const CG_OK: i32 = 0;
/// The awaited stage was not reached before the timeout.
pub const CG_PENDING: i32 = 1;
/// A null pointer, an out-of-range value or inconsistent arguments.
pub const CG_ERR_INVALID_ARGUMENT: i32 = -1;
/// The configuration JSON is malformed or names an invalid setting.
pub const CG_ERR_CONFIG: i32 = -2;
/// The layout description is invalid (zero dimension, aliasing strides,
/// address overflow) or a block id is out of its range.
pub const CG_ERR_LAYOUT: i32 = -3;
/// A storage tier could not be opened or used.
pub const CG_ERR_STORAGE: i32 = -4;
/// The operation needs a GPU and none is usable.
pub const CG_ERR_NO_GPU: i32 = -5;
/// An output buffer is too small; the size needed was written.
pub const CG_ERR_BUFFER_TOO_SMALL: i32 = -6;
/// Something this build does not handle (no current case; kept so status values stay stable).
pub const CG_ERR_UNSUPPORTED: i32 = -7;
/// A bug in libcachegen (a caught panic). The handle stays usable.
pub const CG_ERR_INTERNAL: i32 = -100;

/// `cg_layout_desc.dtype`: IEEE half.
pub const CG_DTYPE_F16: u32 = 1;
/// `cg_layout_desc.dtype`: bfloat16.
pub const CG_DTYPE_BF16: u32 = 2;
/// `cg_layout_desc.dtype`: IEEE single.
pub const CG_DTYPE_F32: u32 = 3;
/// `cg_layout_desc.dtype`: FP8 E4M3 (`float8_e4m3fn`, 1 byte; vLLM's
/// `--kv-cache-dtype fp8`), coded in its stored units: the engine's per-layer
/// k/v scales are neither needed nor applied. Chunks stored as FP8 load only
/// into FP8 layouts.
pub const CG_DTYPE_F8E4M3: u32 = 4;

/// `cg_layout_desc.kind`: keys and values (two streams per layer).
pub const CG_KIND_KEY_VALUE: u32 = 0;
/// `cg_layout_desc.kind`: one latent stream of one head per layer (MLA).
pub const CG_KIND_LATENT: u32 = 1;

/// `cg_layout_desc.memory`: `layer_base` are host pointers.
pub const CG_MEMORY_HOST: u32 = 0;
/// `cg_layout_desc.memory`: `layer_base` are CUDA device pointers (all on one
/// device; `cg_layout_new` asks the driver which, and fails with
/// `CG_ERR_NO_GPU` where there is none).
pub const CG_MEMORY_CUDA: u32 = 1;

/// Store: the source blocks were read and may be overwritten. Load: as DONE.
pub const CG_STAGE_REUSABLE: u32 = 1;
/// Store: every chunk written (durable) or failed. Load: every block written
/// or reported failed; the destination memory is no longer touched.
pub const CG_STAGE_DONE: u32 = 2;

/// `cg_job_progress.kind`
pub const CG_JOB_STORE: u32 = 1;
/// `cg_job_progress.kind`
pub const CG_JOB_LOAD: u32 = 2;

/// A context: configuration, storage tiers and worker threads.
pub struct cg_context {
    inner: Context,
}

/// A validated description of an engine's paged KV memory.
pub struct cg_layout {
    inner: Arc<KvLayout>,
}

/// A store or load in progress (or finished).
pub struct cg_job {
    inner: Arc<Job>,
}

/// An engine's paged KV memory. Element (layer `l`, stream `s` (0 key or
/// latent, 1 value), block `b`, token-in-block `t`, head `h`, dim `d`) is at
/// `layer_base[l] + l*stride_layer + b*stride_block + s*stride_kv +
/// t*stride_token + h*stride_head + d*element_size` (bytes).
#[repr(C)]
pub struct cg_layout_desc {
    /// `CG_KIND_*`.
    pub kind: u32,
    /// `CG_DTYPE_*`.
    pub dtype: u32,
    /// `CG_MEMORY_*`.
    pub memory: u32,
    pub layers: u32,
    pub num_blocks: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// KV heads held by this rank (1 for `CG_KIND_LATENT`).
    pub heads: u32,
    pub head_dim: u32,
    /// `layers` base addresses (one per layer; all equal for a shared pool).
    pub layer_base: *const u64,
    pub stride_block: i64,
    pub stride_kv: i64,
    pub stride_token: i64,
    pub stride_head: i64,
    pub stride_layer: i64,
}

/// A snapshot of a job's progress, filled by `cg_job_info`.
#[repr(C)]
#[derive(Default)]
pub struct cg_job_progress {
    /// `CG_JOB_STORE` or `CG_JOB_LOAD`.
    pub kind: u32,
    /// 1 once `CG_STAGE_REUSABLE` is reached.
    pub reusable: u32,
    /// 1 once `CG_STAGE_DONE` is reached.
    pub done: u32,
    /// Layers `0 .. layers_done` are complete (loads).
    pub layers_done: u32,
    pub layers: u32,
    pub chunks_ok: u64,
    pub chunks_failed: u64,
    /// Store: chunks already stored, not written again.
    pub chunks_skipped: u64,
    /// Number of distinct failed blocks (see `cg_job_failed_blocks`).
    pub failed_blocks: u64,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let mut msg = msg.into().into_bytes();
    msg.retain(|&b| b != 0);
    let c = CString::new(msg).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn fail(code: i32, msg: impl Into<String>) -> i32 {
    set_error(msg);
    code
}

fn connector_error(e: ConnectorError) -> i32 {
    let code = match &e {
        ConnectorError::Config(_) => CG_ERR_CONFIG,
        ConnectorError::InvalidArgument(_) => CG_ERR_INVALID_ARGUMENT,
        ConnectorError::Layout(_) => CG_ERR_LAYOUT,
        ConnectorError::Store(_) => CG_ERR_STORAGE,
        ConnectorError::Threads(_) => CG_ERR_INTERNAL,
        ConnectorError::NoGpu(_) => CG_ERR_NO_GPU,
        ConnectorError::Unsupported(_) => CG_ERR_UNSUPPORTED,
    };
    fail(code, e.to_string())
}

/// Runs `f`, turning a panic into `CG_ERR_INTERNAL`.
fn guard(f: impl FnOnce() -> i32) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(code) => code,
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            fail(CG_ERR_INTERNAL, format!("internal error: {}", what.unwrap_or_else(|| "panic".into())))
        }
    }
}

macro_rules! arg {
    ($ptr:expr, $name:literal) => {
        match unsafe { $ptr.as_ref() } {
            Some(r) => r,
            None => return fail(CG_ERR_INVALID_ARGUMENT, concat!($name, " is null")),
        }
    };
}

macro_rules! out {
    ($ptr:expr, $name:literal) => {
        match unsafe { $ptr.as_mut() } {
            Some(r) => r,
            None => return fail(CG_ERR_INVALID_ARGUMENT, concat!($name, " (output) is null")),
        }
    };
}

/// `len` elements at `ptr`; null is allowed only for `len == 0`.
unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T], i32> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(fail(CG_ERR_INVALID_ARGUMENT, format!("{name} is null but its length is {len}")));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(fail(CG_ERR_INVALID_ARGUMENT, format!("{name}: length {len} is too large")));
    }
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A request's token, block id and salt arrays.
type Request<'a> = (&'a [u32], &'a [u32], &'a [u8]);

/// The token, block id and salt arrays of a store or load request.
unsafe fn request<'a>(
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    salt: *const u8,
    salt_len: usize,
) -> Result<Request<'a>, i32> {
    unsafe { Ok((slice(tokens, n_tokens, "tokens")?, slice(block_ids, n_blocks, "block_ids")?, slice(salt, salt_len, "salt")?)) }
}

/// Hands a started job to the caller through `out`, or reports the error.
fn job_out(out: &mut *mut cg_job, started: Result<Arc<Job>, ConnectorError>) -> i32 {
    match started {
        Ok(job) => {
            *out = Box::into_raw(Box::new(cg_job { inner: job }));
            CG_OK
        }
        Err(e) => connector_error(e),
    }
}

fn timeout(ms: i64) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

/// The library version, e.g. "0.1.0" (static storage; never free it).
#[no_mangle]
pub extern "C" fn cg_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last failed call on this thread ("" if none). Valid
/// until the next failing call on this thread; never free it.
#[no_mangle]
pub extern "C" fn cg_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates a context from a JSON configuration (docs/ABI.md, "Configuration").
/// On success `*out` owns the context; release it with `cg_context_free`.
#[no_mangle]
pub unsafe extern "C" fn cg_context_new(config_json: *const c_char, out: *mut *mut cg_context) -> i32 {
    guard(|| {
        let out = out!(out, "out");
        *out = std::ptr::null_mut();
        if config_json.is_null() {
            return fail(CG_ERR_INVALID_ARGUMENT, "config_json is null");
        }
        let Ok(json) = unsafe { CStr::from_ptr(config_json) }.to_str() else {
            return fail(CG_ERR_CONFIG, "config_json is not UTF-8");
        };
        match Context::from_json(json) {
            Ok(ctx) => {
                *out = Box::into_raw(Box::new(cg_context { inner: ctx }));
                CG_OK
            }
            Err(e) => connector_error(e),
        }
    })
}

/// Releases a context (null is ignored). Blocks until its worker threads
/// have finished the jobs already started. Jobs and layouts stay valid
/// handles and must still be freed.
#[no_mangle]
pub unsafe extern "C" fn cg_context_free(ctx: *mut cg_context) {
    if !ctx.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(ctx) })));
    }
}

/// Validates a layout description and copies it into a handle (the
/// `layer_base` array is copied; the memory it points to is not touched).
#[no_mangle]
pub unsafe extern "C" fn cg_layout_new(desc: *const cg_layout_desc, out: *mut *mut cg_layout) -> i32 {
    guard(|| {
        let out = out!(out, "out");
        *out = std::ptr::null_mut();
        let d = arg!(desc, "desc");
        let kind = match d.kind {
            CG_KIND_KEY_VALUE => KvKind::KeyValue,
            CG_KIND_LATENT => KvKind::Latent,
            k => return fail(CG_ERR_INVALID_ARGUMENT, format!("kind {k} is not CG_KIND_KEY_VALUE or CG_KIND_LATENT")),
        };
        let Some(dtype) = u8::try_from(d.dtype).ok().and_then(Dtype::from_code) else {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("dtype {} is not a CG_DTYPE_*", d.dtype));
        };
        if d.memory != CG_MEMORY_HOST && d.memory != CG_MEMORY_CUDA {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("memory {} is not a CG_MEMORY_*", d.memory));
        }
        let bases = match unsafe { slice(d.layer_base, d.layers as usize, "layer_base") } {
            Ok(b) => b,
            Err(code) => return code,
        };
        let mut layer_base = Vec::with_capacity(bases.len());
        if let Some(l) = bases.iter().position(|&b| b == 0) {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("layer_base[{l}] is a null pointer"));
        }
        for &b in bases {
            match usize::try_from(b) {
                Ok(b) => layer_base.push(b),
                Err(_) => return fail(CG_ERR_LAYOUT, "a layer_base address does not fit this platform"),
            }
        }
        let memory = if d.memory == CG_MEMORY_CUDA {
            match crate::gpu::device_of(bases) {
                Ok(device) => Memory::Cuda { device },
                Err(e @ GpuError::NoGpu(_)) => return fail(CG_ERR_NO_GPU, format!("CG_MEMORY_CUDA layout: {e}")),
                Err(e) => return fail(CG_ERR_INVALID_ARGUMENT, format!("CG_MEMORY_CUDA layout: {e}")),
            }
        } else {
            Memory::Host
        };
        let strides = [d.stride_block, d.stride_kv, d.stride_token, d.stride_head, d.stride_layer].map(isize::try_from);
        let [Ok(stride_block), Ok(stride_kv), Ok(stride_token), Ok(stride_head), Ok(stride_layer)] = strides else {
            return fail(CG_ERR_LAYOUT, "a stride does not fit this platform");
        };
        let layout = KvLayout {
            memory,
            kind,
            dtype,
            layers: d.layers as usize,
            num_blocks: d.num_blocks as usize,
            block_size: d.block_size as usize,
            heads: d.heads as usize,
            head_dim: d.head_dim as usize,
            layer_base,
            stride_block,
            stride_kv,
            stride_token,
            stride_head,
            stride_layer,
        };
        if let Err(e) = layout.validate() {
            return fail(CG_ERR_LAYOUT, e.to_string());
        }
        *out = Box::into_raw(Box::new(cg_layout { inner: Arc::new(layout) }));
        CG_OK
    })
}

/// Releases a layout handle (null is ignored). Jobs using it keep their own
/// reference.
#[no_mangle]
pub unsafe extern "C" fn cg_layout_free(layout: *mut cg_layout) {
    if !layout.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(layout) })));
    }
}

/// How many leading tokens of `tokens` can be loaded (a multiple of the
/// chunk size; every TP rank's shard present). With `lease_ms > 0` the
/// entries found are protected from eviction for that long, until
/// `cg_lease_release`, or until a load given the lease has fetched them;
/// `*lease_id` is 0 when no lease was taken. `lease_id` may be null when
/// `lease_ms` is 0.
#[no_mangle]
pub unsafe extern "C" fn cg_lookup(
    ctx: *const cg_context,
    tokens: *const u32,
    n_tokens: usize,
    salt: *const u8,
    salt_len: usize,
    lease_ms: u32,
    matched_tokens: *mut u64,
    lease_id: *mut u64,
) -> i32 {
    guard(|| {
        let ctx = arg!(ctx, "ctx");
        let matched = out!(matched_tokens, "matched_tokens");
        let lease_out = unsafe { lease_id.as_mut() };
        if lease_ms > 0 && lease_out.is_none() {
            return fail(CG_ERR_INVALID_ARGUMENT, "lease_id (output) is null but lease_ms > 0");
        }
        let (tokens, salt) = match unsafe { (slice(tokens, n_tokens, "tokens"), slice(salt, salt_len, "salt")) } {
            (Ok(t), Ok(s)) => (t, s),
            (Err(c), _) | (_, Err(c)) => return c,
        };
        let r = ctx.inner.lookup(tokens, salt, (lease_ms > 0).then(|| Duration::from_millis(lease_ms as u64)));
        *matched = r.tokens as u64;
        if let Some(l) = lease_out {
            *l = r.lease;
        }
        CG_OK
    })
}

/// Ends a lease early. Ending a lease that already ended (expired, released,
/// consumed by a load, or 0) is not an error.
#[no_mangle]
pub unsafe extern "C" fn cg_lease_release(ctx: *const cg_context, lease_id: u64) -> i32 {
    guard(|| {
        let ctx = arg!(ctx, "ctx");
        ctx.inner.release_lease(lease_id);
        CG_OK
    })
}

/// Starts storing every full chunk of `tokens` not stored yet, reading token
/// `i` from block `block_ids[i / block_size]` of `layout`. On success `*out`
/// is a job; the blocks must stay unchanged until it reaches
/// `CG_STAGE_REUSABLE`.
#[no_mangle]
pub unsafe extern "C" fn cg_store(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    salt: *const u8,
    salt_len: usize,
    out: *mut *mut cg_job,
) -> i32 {
    // SAFETY: forwarded.
    unsafe { store_with(ctx, layout, tokens, n_tokens, block_ids, n_blocks, salt, salt_len, None, out) }
}

/// Starts loading the full chunks of `tokens` into `block_ids` of `layout`,
/// skipping the first `first_token` tokens (a multiple of the block size:
/// those the engine already has). Blocks of chunks that cannot be loaded are
/// reported by `cg_job_failed_blocks`. `lease_id` (0: none) is ended once
/// every chunk has been fetched. The destination blocks must not be used
/// until the job is done (a layer's blocks: until `cg_job_wait_layer`).
#[no_mangle]
pub unsafe extern "C" fn cg_load(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    first_token: usize,
    salt: *const u8,
    salt_len: usize,
    lease_id: u64,
    out: *mut *mut cg_job,
) -> i32 {
    // SAFETY: forwarded.
    unsafe { load_with(ctx, layout, tokens, n_tokens, block_ids, n_blocks, first_token, salt, salt_len, lease_id, None, out) }
}

/// `cg_store` for a layout in GPU memory (`CG_MEMORY_CUDA`): the gather
/// from the blocks is ordered after the work enqueued so far on the engine's
/// CUDA stream `cuda_stream` (a `CUstream`/`cudaStream_t` of the layout's
/// device, as an integer; 0 is the legacy default stream). For a host
/// layout the stream is ignored.
#[no_mangle]
pub unsafe extern "C" fn cg_store_on_stream(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    salt: *const u8,
    salt_len: usize,
    cuda_stream: u64,
    out: *mut *mut cg_job,
) -> i32 {
    // SAFETY: forwarded.
    unsafe { store_with(ctx, layout, tokens, n_tokens, block_ids, n_blocks, salt, salt_len, Some(cuda_stream), out) }
}

/// `cg_load` for a layout in GPU memory (`CG_MEMORY_CUDA`): the decode runs
/// on the GPU after the work enqueued so far on `cuda_stream` (as for
/// `cg_store_on_stream`); make the engine's stream wait for each layer with
/// `cg_job_wait_layer_on_stream`. For a host layout the stream is ignored.
#[no_mangle]
pub unsafe extern "C" fn cg_load_on_stream(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    first_token: usize,
    salt: *const u8,
    salt_len: usize,
    lease_id: u64,
    cuda_stream: u64,
    out: *mut *mut cg_job,
) -> i32 {
    // SAFETY: forwarded.
    unsafe { load_with(ctx, layout, tokens, n_tokens, block_ids, n_blocks, first_token, salt, salt_len, lease_id, Some(cuda_stream), out) }
}

/// `cg_store` and `cg_store_on_stream`: the stream matters only for device memory.
#[allow(clippy::too_many_arguments)]
unsafe fn store_with(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    salt: *const u8,
    salt_len: usize,
    stream: Option<u64>,
    out: *mut *mut cg_job,
) -> i32 {
    guard(|| {
        let out = out!(out, "out");
        *out = std::ptr::null_mut();
        let ctx = arg!(ctx, "ctx");
        let layout = arg!(layout, "layout");
        let (tokens, blocks, salt) = match unsafe { request(tokens, n_tokens, block_ids, n_blocks, salt, salt_len) } {
            Ok(r) => r,
            Err(code) => return code,
        };
        let stream = stream.filter(|_| layout.inner.memory != Memory::Host);
        // SAFETY: the caller's contract (docs/ABI.md): the layout's memory is
        // valid (host, or device memory of its GPU), unchanged until the job
        // is reusable; a stream is a live stream of the layout's device.
        job_out(out, unsafe { ctx.inner.store_on(Arc::clone(&layout.inner), tokens, blocks, salt, stream) })
    })
}

/// `cg_load` and `cg_load_on_stream`: the stream matters only for device memory.
#[allow(clippy::too_many_arguments)]
unsafe fn load_with(
    ctx: *const cg_context,
    layout: *const cg_layout,
    tokens: *const u32,
    n_tokens: usize,
    block_ids: *const u32,
    n_blocks: usize,
    first_token: usize,
    salt: *const u8,
    salt_len: usize,
    lease_id: u64,
    stream: Option<u64>,
    out: *mut *mut cg_job,
) -> i32 {
    guard(|| {
        let out = out!(out, "out");
        *out = std::ptr::null_mut();
        let ctx = arg!(ctx, "ctx");
        let layout = arg!(layout, "layout");
        let (tokens, blocks, salt) = match unsafe { request(tokens, n_tokens, block_ids, n_blocks, salt, salt_len) } {
            Ok(r) => r,
            Err(code) => return code,
        };
        let stream = stream.filter(|_| layout.inner.memory != Memory::Host);
        // SAFETY: the caller's contract (docs/ABI.md): the destination blocks
        // are valid (host, or device memory of its GPU), untouched by the
        // engine until the job is done; a stream is a live stream of the
        // layout's device.
        job_out(out, unsafe { ctx.inner.load_on(Arc::clone(&layout.inner), tokens, blocks, first_token, salt, lease_id, stream) })
    })
}

fn parse_stage(s: u32) -> Option<Stage> {
    match s {
        CG_STAGE_REUSABLE => Some(Stage::Reusable),
        CG_STAGE_DONE => Some(Stage::Done),
        _ => None,
    }
}

/// Waits until the job reaches `stage` (`CG_STAGE_*`): `CG_OK` when reached,
/// `CG_PENDING` when `timeout_ms` passed first (0: poll; negative: no limit).
/// Reaching DONE does not mean every chunk succeeded: see `cg_job_info`.
#[no_mangle]
pub unsafe extern "C" fn cg_job_wait(job: *const cg_job, stage: u32, timeout_ms: i64) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        let Some(st) = parse_stage(stage) else {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("stage {stage} is not a CG_STAGE_*"));
        };
        if job.inner.wait(st, timeout(timeout_ms)) {
            CG_OK
        } else {
            CG_PENDING
        }
    })
}

/// Waits until layer `layer` of a load is complete (written, or its chunk
/// failed): `CG_OK`, or `CG_PENDING` after `timeout_ms` (negative: no limit).
/// For a store job, waits for DONE.
#[no_mangle]
pub unsafe extern "C" fn cg_job_wait_layer(job: *const cg_job, layer: u32, timeout_ms: i64) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        if layer as usize >= job.inner.layers {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("layer {layer} of a {}-layer job", job.inner.layers));
        }
        if job.inner.wait_layer(layer as usize, timeout(timeout_ms)) {
            CG_OK
        } else {
            CG_PENDING
        }
    })
}

/// For a load into GPU memory: waits on the host until layer `layer`'s
/// decode is enqueued (every chunk fetched: `CG_PENDING` if `timeout_ms`
/// passes first; negative: no limit), then makes the engine's CUDA stream
/// `cuda_stream` wait for the layer on the device and returns `CG_OK`
/// without waiting for the GPU. What a per-layer wait in an engine's
/// forward pass needs. For a host load, the same as `cg_job_wait_layer`.
#[no_mangle]
pub unsafe extern "C" fn cg_job_wait_layer_on_stream(job: *const cg_job, layer: u32, cuda_stream: u64, timeout_ms: i64) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        if layer as usize >= job.inner.layers {
            return fail(CG_ERR_INVALID_ARGUMENT, format!("layer {layer} of a {}-layer job", job.inner.layers));
        }
        match job.inner.wait_layer_on_stream(layer as usize, cuda_stream, timeout(timeout_ms)) {
            Ok(true) => CG_OK,
            Ok(false) => CG_PENDING,
            Err(e) => fail(CG_ERR_INVALID_ARGUMENT, format!("cannot make the stream wait: {e}")),
        }
    })
}

/// Fills `*info` with the job's progress.
#[no_mangle]
pub unsafe extern "C" fn cg_job_info(job: *const cg_job, info: *mut cg_job_progress) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        let info = out!(info, "info");
        let p = job.inner.progress();
        *info = cg_job_progress {
            kind: match job.inner.kind {
                JobKind::Store => CG_JOB_STORE,
                JobKind::Load => CG_JOB_LOAD,
            },
            reusable: p.reusable as u32,
            done: p.done as u32,
            layers_done: p.layers_done as u32,
            layers: job.inner.layers as u32,
            chunks_ok: p.chunks_ok as u64,
            chunks_failed: p.chunks_failed as u64,
            chunks_skipped: p.chunks_skipped as u64,
            failed_blocks: p.failed_blocks.len() as u64,
        };
        CG_OK
    })
}

/// Copies up to `cap` failed block ids (sorted, distinct) into `out` and the
/// total number into `*count`. `out` may be null when `cap` is 0. The list is
/// final once the job is done.
#[no_mangle]
pub unsafe extern "C" fn cg_job_failed_blocks(job: *const cg_job, out: *mut u32, cap: usize, count: *mut usize) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        let count = out!(count, "count");
        if cap > 0 && out.is_null() {
            return fail(CG_ERR_INVALID_ARGUMENT, "out is null but cap > 0");
        }
        let p = job.inner.progress();
        *count = p.failed_blocks.len();
        let n = cap.min(p.failed_blocks.len());
        if n > 0 {
            // SAFETY: the caller provides `cap >= n` writable u32s at `out`.
            unsafe { std::ptr::copy_nonoverlapping(p.failed_blocks.as_ptr(), out, n) };
        }
        CG_OK
    })
}

/// What a load did with one chunk, filled by `cg_job_chunk_decisions` (loads
/// whose chunks are stored at several levels, or adaptive loads).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct cg_chunk_decision {
    /// Index of the chunk in the load (0 = the first chunk loaded).
    pub chunk: u32,
    /// Level planned before the fetch: 1 compact, 2 default, 3 high,
    /// 4 lossless, or 0 = left for the engine to recompute.
    pub planned: u32,
    /// What happened, coded the same way: the level delivered, or 0 when the
    /// chunk was left for recompute (planned, missing, or fetched too late).
    /// Chunks with outcome 0 are among the job's failed blocks.
    pub outcome: u32,
    pub reserved: u32,
    /// The bandwidth estimate the decision used (bytes/s; 0 when none).
    pub est_bytes_per_s: f64,
    /// The time budget the decision used for this chunk (s; 0 when none).
    pub budget_s: f64,
    /// Bytes fetched, and how long the fetch took (s); 0 when not fetched.
    pub bytes: u64,
    pub fetch_s: f64,
}

/// Copies up to `cap` per-chunk decisions of a load (in chunk order, as far
/// as they are made; final once the job is done) into `out` and the total
/// number into `*count`. Jobs that choose no levels have none. `out` may be
/// null when `cap` is 0.
#[no_mangle]
pub unsafe extern "C" fn cg_job_chunk_decisions(job: *const cg_job, out: *mut cg_chunk_decision, cap: usize, count: *mut usize) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        let count = out!(count, "count");
        if cap > 0 && out.is_null() {
            return fail(CG_ERR_INVALID_ARGUMENT, "out is null but cap > 0");
        }
        let d = job.inner.chunk_decisions();
        *count = d.len();
        for (i, x) in d.iter().take(cap).enumerate() {
            let v = cg_chunk_decision {
                chunk: x.chunk as u32,
                planned: x.planned.code() as u32,
                outcome: x.outcome.code() as u32,
                reserved: 0,
                est_bytes_per_s: x.est_bytes_per_s,
                budget_s: x.budget_s,
                bytes: x.bytes,
                fetch_s: x.fetch_s,
            };
            // SAFETY: the caller provides `cap` writable elements at `out`.
            unsafe { out.add(i).write(v) };
        }
        CG_OK
    })
}

/// Copies the job's failure reasons (one per line, the first few) as a
/// NUL-terminated string into `buf`; `*len` is the length needed without
/// the NUL. `CG_ERR_BUFFER_TOO_SMALL` if `cap <= *len` (nothing copied).
#[no_mangle]
pub unsafe extern "C" fn cg_job_errors(job: *const cg_job, buf: *mut c_char, cap: usize, len: *mut usize) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        let text = job.inner.progress().errors.join("\n");
        unsafe { copy_string(&text, buf, cap, len) }
    })
}

unsafe fn copy_string(text: &str, buf: *mut c_char, cap: usize, len: *mut usize) -> i32 {
    let len = out!(len, "len");
    *len = text.len();
    if cap <= text.len() || buf.is_null() {
        return fail(CG_ERR_BUFFER_TOO_SMALL, format!("{} bytes are needed, the buffer has {cap}", text.len() + 1));
    }
    // SAFETY: `buf` has `cap > text.len()` writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    CG_OK
}

/// Asks the job to stop: a load fails the chunks not yet written (their
/// blocks are reported). Returns at once; wait for DONE afterwards.
#[no_mangle]
pub unsafe extern "C" fn cg_job_cancel(job: *const cg_job) -> i32 {
    guard(|| {
        let job = arg!(job, "job");
        job.inner.cancel();
        CG_OK
    })
}

/// Releases a job handle (null is ignored), first making sure the job no
/// longer touches engine memory: a load is cancelled and waited for; a store
/// is waited for until REUSABLE (it then finishes in the background).
#[no_mangle]
pub unsafe extern "C" fn cg_job_free(job: *mut cg_job) {
    if job.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let job = unsafe { Box::from_raw(job) };
        match job.inner.kind {
            JobKind::Load => {
                if !job.inner.progress().done {
                    job.inner.cancel();
                }
                job.inner.wait(Stage::Done, None);
            }
            JobKind::Store => {
                job.inner.wait(Stage::Reusable, None);
            }
        }
    }));
}

/// Copies the context's statistics (JSON: counters, throughput, tiers,
/// leases, queues) into `buf` like `cg_job_errors`.
#[no_mangle]
pub unsafe extern "C" fn cg_stats_json(ctx: *const cg_context, buf: *mut c_char, cap: usize, len: *mut usize) -> i32 {
    guard(|| {
        let ctx = arg!(ctx, "ctx");
        unsafe { copy_string(&ctx.inner.stats_json(), buf, cap, len) }
    })
}
