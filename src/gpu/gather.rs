//! Gather on the device: an engine's paged KV blocks (a [`KvLayout`] with
//! device addresses) to dense chunk tensors on the host, for stores from GPU
//! memory. One kernel (`cuda/gather.cu`) packs every chunk of a call into a
//! device buffer in [`KvTensors`] order; one copy brings it to pinned host
//! memory. The result equals [`KvLayout::gather`] on the same bytes
//! (tests/gpu_connector.rs).

use std::ffi::c_void;
use std::sync::Mutex;

use crate::codec::KvTensors;
use crate::layout::KvLayout;

use super::driver::{self, DeviceBuffer, Module, PinnedBuffer, Stream};
use super::{nvrtc, Event, Gpu, GpuError};

/// The kernel source, compiled at run time (cuda/README.md).
pub const GATHER_CU: &str = include_str!("../../cuda/gather.cu");

// Mirror of `Src` in cuda/gather.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Src {
    layer_base: u64,
    block_ids: u64,
    stride_block: i64,
    stride_kv: i64,
    stride_token: i64,
    stride_head: i64,
    stride_layer: i64,
    block_size: u32,
    blocks_per_chunk: u32,
    tokens: u32,
    heads: u32,
    head_dim: u32,
    streams: u32,
    layers: u32,
    elem: u32,
    unit: u32,
    chunks: u32,
}

struct Buffers {
    out: Option<DeviceBuffer>,
    host: Option<PinnedBuffer>,
    args: Option<DeviceBuffer>,
    stream: Stream,
    done: Event,
}

/// Gathers chunks from paged device memory. Thread-safe; calls are serialised.
pub struct GpuGather {
    gpu: Gpu,
    _module: Module,
    f: cudarc::driver::sys::CUfunction,
    bufs: Mutex<Buffers>,
}

// SAFETY: the function handle is usable from any thread with the context current.
unsafe impl Send for GpuGather {}
unsafe impl Sync for GpuGather {}

impl GpuGather {
    /// Compile the kernel for this device.
    pub fn new(gpu: &Gpu) -> Result<GpuGather, GpuError> {
        gpu.bind()?;
        let (maj, min) = gpu.compute_capability();
        let (cubin, _log) = nvrtc::compile(GATHER_CU, "gather.cu", maj, min, &[])?;
        let module = Module::load(&cubin)?;
        let f = module.function("cg_gather")?;
        let bufs = Buffers { out: None, host: None, args: None, stream: Stream::new()?, done: Event::new(false)? };
        Ok(GpuGather { gpu: gpu.clone(), _module: module, f, bufs: Mutex::new(bufs) })
    }

    /// The chunks `chunks[i]` (block ids; token `t` in `chunks[i][t / block_size]`)
    /// of `tokens` tokens each, as host tensors. When `after` (a raw CUDA
    /// event) is given, the gather waits for it on the device first, so it
    /// reads what the engine's stream wrote before recording it.
    ///
    /// # Safety
    /// `layout.layer_base` must be device addresses of this GPU and every
    /// element of the named blocks valid device memory, unchanged by others
    /// until the call returns.
    pub unsafe fn gather(&self, layout: &KvLayout, chunks: &[&[u32]], tokens: usize, after: Option<u64>) -> Result<Vec<KvTensors>, GpuError> {
        layout.validate().map_err(|e| GpuError::Invalid(e.to_string()))?;
        if tokens == 0 || chunks.is_empty() {
            return Ok(Vec::new());
        }
        let per_chunk = tokens.div_ceil(layout.block_size);
        for (i, ids) in chunks.iter().enumerate() {
            if ids.len() < per_chunk {
                return Err(GpuError::Invalid(format!("chunk {i}: {tokens} tokens need {per_chunk} blocks, {} given", ids.len())));
            }
            if let Some(&id) = ids[..per_chunk].iter().find(|&&id| id as usize >= layout.num_blocks) {
                return Err(GpuError::Invalid(format!("chunk {i}: block id {id} out of range ({} blocks)", layout.num_blocks)));
            }
        }
        let shape = layout.chunk_shape(tokens);
        let es = layout.dtype.size();
        let tensor_bytes = shape.plane_elems() * es;
        let chunk_bytes = tensor_bytes * shape.tensors();
        let total = chunk_bytes * chunks.len();
        // The widest unit that every row start is aligned to.
        let row = layout.head_dim * es;
        let align_of = |v: u64| v.trailing_zeros().min(4);
        let mut a = align_of(row as u64);
        for &b in &layout.layer_base {
            a = a.min(align_of(b as u64));
        }
        for s in [layout.stride_block, layout.stride_kv, layout.stride_token, layout.stride_head, layout.stride_layer] {
            if s != 0 {
                a = a.min(align_of(s.unsigned_abs() as u64));
            }
        }
        let unit = 1u32 << a;
        // Arguments: layer bases, then block ids.
        let mut args: Vec<u8> = Vec::new();
        for &b in &layout.layer_base {
            args.extend_from_slice(&(b as u64).to_le_bytes());
        }
        let ids_at = args.len();
        for ids in chunks {
            for &id in &ids[..per_chunk] {
                args.extend_from_slice(&id.to_le_bytes());
            }
        }
        self.gpu.bind()?;
        let mut g = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *g;
        if b.out.as_ref().map_or(true, |o| o.len() < total) {
            b.out = None;
            b.out = Some(self.gpu.alloc(total)?);
            b.host = None;
            b.host = Some(self.gpu.alloc_pinned(total)?);
        }
        if b.args.as_ref().map_or(true, |o| o.len() < args.len()) {
            b.args = None;
            b.args = Some(self.gpu.alloc(args.len().max(4096))?);
        }
        let args_dev = b.args.as_ref().unwrap();
        args_dev.write(0, &args)?;
        if let Some(ev) = after {
            b.stream.wait_raw(ev)?;
        }
        let mut src = Src {
            layer_base: args_dev.ptr(),
            block_ids: args_dev.ptr() + ids_at as u64,
            stride_block: layout.stride_block as i64,
            stride_kv: layout.stride_kv as i64,
            stride_token: layout.stride_token as i64,
            stride_head: layout.stride_head as i64,
            stride_layer: layout.stride_layer as i64,
            block_size: layout.block_size as u32,
            blocks_per_chunk: per_chunk as u32,
            tokens: tokens as u32,
            heads: layout.heads as u32,
            head_dim: layout.head_dim as u32,
            streams: layout.streams() as u32,
            layers: layout.layers as u32,
            elem: es as u32,
            unit,
            chunks: chunks.len() as u32,
        };
        let mut out = b.out.as_ref().unwrap().ptr();
        let mut params: [*mut c_void; 2] = [&mut src as *mut _ as *mut c_void, &mut out as *mut _ as *mut c_void];
        let units = (total / unit as usize) as u64;
        let grid = units.div_ceil(256).clamp(1, 65535 * 4) as u32;
        // SAFETY: the parameters match cg_gather; the source is the caller's promise,
        // the output holds `total` bytes.
        unsafe { driver::launch(self.f, (grid, 1, 1), (256, 1, 1), 0, &b.stream, &mut params)? };
        let host = b.host.as_mut().unwrap();
        // SAFETY: `out` holds `total` bytes; the pinned buffer outlives the wait below.
        unsafe { driver::copy_dtoh(&mut host.as_mut_slice()[..total], out, &b.stream)? };
        b.done.record(&b.stream)?;
        b.done.sync()?;
        let bytes = &host.as_slice()[..total];
        Ok(bytes
            .chunks_exact(chunk_bytes)
            .map(|c| KvTensors { shape, dtype: layout.dtype, tensors: c.chunks_exact(tensor_bytes).map(|t| t.to_vec()).collect() })
            .collect())
    }
}
