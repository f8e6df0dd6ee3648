//! GPU path (issue 5): device memory, CUDA kernels compiled from `cuda/`,
//! streams and events. Everything CUDA lives here.
//!
//! The library builds and runs without CUDA: [`Gpu::open`] first checks that
//! the driver library (`libcuda.so.1`) can be loaded, and only then touches
//! `cudarc` (whose dynamic loader panics when the library is missing); every
//! driver call is also wrapped in `catch_unwind`. Without a usable GPU the
//! result is [`GpuError::NoGpu`] with the reason.
//!
//! Kernels (`cuda/decode.cu`) are embedded in the library and compiled at run
//! time with NVRTC for the device's own architecture (sm_80 or newer); see
//! `cuda/README.md` for why.
//!
//! What is here:
//! - [`Gpu`]: one device, its context and the compiled kernels.
//! - [`GpuDecoder`]: decodes `.cg` containers straight into an engine's paged
//!   KV blocks described by a [`crate::layout::KvLayout`] whose `layer_base`
//!   entries are device addresses. One fused kernel: rANS decode (a warp per
//!   segment, a lane per channel), table normalisation and lookup,
//!   dequantization and the scatter; no dense intermediate tensor. The result
//!   is bit-identical to [`crate::codec::decode`] followed by
//!   [`crate::layout::KvLayout::scatter`].
//! - [`GpuEncoder`]: encodes straight from paged KV blocks on the device
//!   (gather, quantization, tables, rANS, container sections), output
//!   byte-identical to [`crate::codec::encode`] (lossy levels, embedded tables).
//! - [`GpuGather`]: paged device blocks to dense host tensors (one kernel,
//!   one copy), for what the GPU encoder does not take (the lossless level).
//! - [`DeviceBuffer`], [`PinnedBuffer`], [`Event`]: small owned wrappers.

mod decode;
mod driver;
mod encode;
mod gather;
pub mod nvrtc;

use std::sync::Arc;

pub use decode::{GpuDecoder, GpuTableSet, LayerEvents, PreparedChunk, Staged, Timings, SKIP_BLOCK};
pub use gather::GpuGather;
pub use driver::{DeviceBuffer, Event, PinnedBuffer};
pub use encode::{EncodeTimings, GpuEncoder, BATCH_SYMBOLS, ENCODE_CU, KERNEL_NAMES, RING};

use driver::Context;

/// Errors of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable GPU here: no driver library, no device, or a device too old.
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC is missing or the kernels failed to compile.
    #[error("kernel compilation: {0}")]
    Compile(String),
    /// A container failed validation on the host (nothing was launched).
    #[error("chunk {chunk}: {source}")]
    Codec {
        chunk: usize,
        #[source]
        source: crate::codec::Error,
    },
    /// A container failed the checks made while decoding on the device
    /// (FORMAT.md 2.2 items 35 and 36). The output blocks of the call may
    /// have been written and must be discarded.
    #[error("chunk {chunk}: corrupt stream detected on the device (error bits {bits:#x})")]
    CorruptOnDevice { chunk: usize, bits: u32 },
    /// The layout, block ids or chunks do not fit together.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A stream feature the GPU decoder does not handle yet.
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
}

/// Check that the CUDA driver library can be loaded, without touching
/// `cudarc`. `Err` carries the reason.
pub fn probe_driver() -> Result<(), String> {
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: dlopen with a valid C string; the handle is closed below.
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            // SAFETY: h is an open handle.
            unsafe { libc::dlclose(h) };
            return Ok(());
        }
    }
    Err("the CUDA driver library (libcuda.so.1) is not installed".into())
}

pub(crate) struct GpuInner {
    pub ctx: Arc<Context>,
    pub name: String,
    pub cc: (i32, i32),
    pub sms: i32,
    pub smem_optin: i32,
}

/// The ordinal of the device that owns the device address `ptr`; `None` when
/// the driver does not know it as device memory (a host pointer, say).
/// `Err(NoGpu)` without a driver.
pub fn pointer_device(ptr: u64) -> Result<Option<usize>, GpuError> {
    probe_driver().map_err(GpuError::NoGpu)?;
    driver::pointer_device(ptr)
}

/// The device that owns every one of `addresses` (an engine's layer bases):
/// `Invalid` when one is not device memory or they span devices.
pub fn device_of(addresses: &[u64]) -> Result<usize, GpuError> {
    let mut device = None;
    for (i, &a) in addresses.iter().enumerate() {
        match pointer_device(a)? {
            None => return Err(GpuError::Invalid(format!("address {i} ({a:#x}) is not CUDA device memory"))),
            Some(d) if device.is_some_and(|x| x != d) => return Err(GpuError::Invalid(format!("address {i} is on device {d}, address 0 on another"))),
            Some(d) => device = Some(d),
        }
    }
    device.ok_or_else(|| GpuError::Invalid("no addresses".into()))
}

/// An event recorded now on an engine's raw `CUstream` (0: the legacy
/// default stream), so that later work can be ordered after what the engine
/// has enqueued so far.
pub fn record_on(gpu: &Gpu, stream: u64) -> Result<Event, GpuError> {
    gpu.bind()?;
    let e = Event::new(false)?;
    e.record_raw(stream)?;
    Ok(e)
}

/// One CUDA device with a retained primary context.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<GpuInner>,
}

impl Gpu {
    /// Open device `ordinal`. `GpuError::NoGpu` on machines without a driver,
    /// without that device, or with a device older than sm_80.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        probe_driver().map_err(GpuError::NoGpu)?;
        let ctx = Context::new(ordinal).map_err(|e| match e {
            GpuError::Driver(m) => GpuError::NoGpu(m),
            e => e,
        })?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let cc = (ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        if cc.0 < 8 {
            return Err(GpuError::NoGpu(format!("compute capability {}.{} is below 8.0", cc.0, cc.1)));
        }
        let sms = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem_optin = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let name = ctx.name()?;
        Ok(Gpu { inner: Arc::new(GpuInner { ctx, name, cc, sms, smem_optin }) })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.cc
    }

    /// Number of multiprocessors.
    pub fn multiprocessors(&self) -> i32 {
        self.inner.sms
    }

    /// Make this device's context current on the calling thread (the
    /// methods here do it themselves; engines sharing the primary context
    /// need not).
    pub fn bind(&self) -> Result<(), GpuError> {
        self.inner.ctx.bind()
    }

    /// Allocate device memory.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, GpuError> {
        DeviceBuffer::new(&self.inner.ctx, len)
    }

    /// Allocate page-locked host memory.
    pub fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer, GpuError> {
        PinnedBuffer::new(&self.inner.ctx, len)
    }

    /// Wait for all work on the device.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        driver::call("cuCtxSynchronize", cudarc::driver::result::ctx::synchronize)
    }
}
