//! Thin, owned wrappers over the CUDA driver API (through `cudarc`'s
//! `driver::result` layer): a context, device and pinned buffers, streams,
//! events and kernel launches. Every call goes through [`call`], which turns
//! both driver errors and panics inside `cudarc` into [`GpuError`].

use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::GpuError;

/// Run a driver call, mapping its error and any panic (cudarc panics when a
/// symbol or the library is missing) to [`GpuError`].
pub(crate) fn call<T>(what: &str, f: impl FnOnce() -> Result<T, result::DriverError>) -> Result<T, GpuError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(GpuError::Driver(format!("{what}: {e:?}"))),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(GpuError::Driver(format!("{what}: panicked in the CUDA bindings: {msg}")))
        }
    }
}

/// A retained primary context of one device. Dropping the last reference
/// releases it.
pub(crate) struct Context {
    pub dev: sys::CUdevice,
    pub ctx: sys::CUcontext,
}

// SAFETY: a CUDA context handle may be used from any thread once made current there.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    pub fn new(ordinal: usize) -> Result<Arc<Context>, GpuError> {
        call("cuInit", result::init)?;
        let count = call("cuDeviceGetCount", result::device::get_count)?;
        if ordinal as i64 >= count as i64 {
            return Err(GpuError::NoGpu(format!("device {ordinal} requested, {count} present")));
        }
        let dev = call("cuDeviceGet", || result::device::get(ordinal as i32))?;
        // SAFETY: dev is a valid device handle.
        let ctx = call("cuDevicePrimaryCtxRetain", || unsafe { result::primary_ctx::retain(dev) })?;
        let c = Arc::new(Context { dev, ctx });
        c.bind()?;
        Ok(c)
    }

    /// Make the context current on this thread.
    pub fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: ctx is a retained context.
        call("cuCtxSetCurrent", || unsafe { result::ctx::set_current(self.ctx) })
    }

    pub fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32, GpuError> {
        // SAFETY: dev is valid.
        call("cuDeviceGetAttribute", || unsafe { result::device::get_attribute(self.dev, a) })
    }

    pub fn name(&self) -> Result<String, GpuError> {
        call("cuDeviceGetName", || result::device::get_name(self.dev))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: retained in `new`.
        let _ = call("cuDevicePrimaryCtxRelease", || unsafe { result::primary_ctx::release(self.dev) });
    }
}

/// Device memory owned by us.
pub struct DeviceBuffer {
    ctx: Arc<Context>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device address is plain data; the context is Send + Sync.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub(crate) fn new(ctx: &Arc<Context>, len: usize) -> Result<DeviceBuffer, GpuError> {
        ctx.bind()?;
        // SAFETY: plain allocation (at least one byte so the pointer is valid).
        let ptr = call("cuMemAlloc", || unsafe { result::malloc_sync(len.max(1)) })?;
        Ok(DeviceBuffer { ctx: ctx.clone(), ptr, len })
    }
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copy `dst.len()` bytes from offset `off` to the host (synchronous).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), GpuError> {
        if off.checked_add(dst.len()).map_or(true, |e| e > self.len) {
            return Err(GpuError::Invalid("device read out of range".into()));
        }
        self.ctx.bind()?;
        // SAFETY: range checked above.
        call("cuMemcpyDtoH", || unsafe { result::memcpy_dtoh_sync(dst, self.ptr + off as u64) })
    }
    /// Copy `src` to offset `off` (synchronous).
    pub fn write(&self, off: usize, src: &[u8]) -> Result<(), GpuError> {
        if off.checked_add(src.len()).map_or(true, |e| e > self.len) {
            return Err(GpuError::Invalid("device write out of range".into()));
        }
        self.ctx.bind()?;
        // SAFETY: range checked above.
        call("cuMemcpyHtoD", || unsafe { result::memcpy_htod_sync(self.ptr + off as u64, src) })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: allocated in `new`, freed once.
            let _ = call("cuMemFree", || unsafe { result::free_sync(self.ptr) });
        }
    }
}

/// Page-locked host memory (fast, asynchronous host-to-device copies).
pub struct PinnedBuffer {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned host memory.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub(crate) fn new(ctx: &Arc<Context>, len: usize) -> Result<PinnedBuffer, GpuError> {
        ctx.bind()?;
        // SAFETY: plain allocation.
        let ptr = call("cuMemHostAlloc", || unsafe { result::malloc_host(len.max(1), 0) })? as *mut u8;
        Ok(PinnedBuffer { ctx: ctx.clone(), ptr, len })
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: allocated with cuMemHostAlloc, freed once.
            let _ = call("cuMemFreeHost", || unsafe { result::free_host(self.ptr as *mut c_void) });
        }
    }
}

/// A stream we created (destroyed on drop), or one borrowed from the caller.
pub(crate) struct Stream {
    pub raw: sys::CUstream,
    owned: bool,
}

unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new() -> Result<Stream, GpuError> {
        let raw = call("cuStreamCreate", || result::stream::create(result::stream::StreamKind::NonBlocking))?;
        Ok(Stream { raw, owned: true })
    }
    pub fn borrowed(raw: u64) -> Stream {
        Stream { raw: raw as usize as sys::CUstream, owned: false }
    }
    pub fn wait(&self, e: &Event) -> Result<(), GpuError> {
        // SAFETY: valid stream and event.
        call("cuStreamWaitEvent", || unsafe { result::stream::wait_event(self.raw, e.raw, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) })
    }
    /// Make this stream wait for a raw `CUevent` (an engine's).
    pub fn wait_raw(&self, e: u64) -> Result<(), GpuError> {
        // SAFETY: the caller passes a live event of this context.
        call("cuStreamWaitEvent", || unsafe {
            result::stream::wait_event(self.raw, e as usize as sys::CUevent, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: created in `new`.
            let _ = call("cuStreamDestroy", || unsafe { result::stream::destroy(self.raw) });
        }
    }
}

/// A CUDA event.
pub struct Event {
    pub(crate) raw: sys::CUevent,
}

unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// `timing`: the event can measure elapsed time.
    pub(crate) fn new(timing: bool) -> Result<Event, GpuError> {
        let flags = if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        Ok(Event { raw: call("cuEventCreate", || result::event::create(flags))? })
    }
    /// Record on a raw `CUstream` (an engine's).
    pub(crate) fn record_raw(&self, s: u64) -> Result<(), GpuError> {
        // SAFETY: the caller passes a live stream of this context (0: the legacy default stream).
        call("cuEventRecord", || unsafe { result::event::record(self.raw, s as usize as sys::CUstream) })
    }
    pub(crate) fn record(&self, s: &Stream) -> Result<(), GpuError> {
        // SAFETY: valid event and stream.
        call("cuEventRecord", || unsafe { result::event::record(self.raw, s.raw) })
    }
    pub fn sync(&self) -> Result<(), GpuError> {
        // SAFETY: valid event.
        call("cuEventSynchronize", || unsafe { result::event::synchronize(self.raw) })
    }
    /// Milliseconds from `start` to `self` (both recorded and complete).
    pub fn since(&self, start: &Event) -> Result<f32, GpuError> {
        // SAFETY: valid events.
        call("cuEventElapsedTime", || unsafe { result::event::elapsed(start.raw, self.raw) })
    }
    /// True when the work before the event's last record has completed (`cuEventQuery`).
    pub fn query(&self) -> Result<bool, GpuError> {
        // SAFETY: valid event.
        call("cuEventQuery", || match unsafe { result::event::query(self.raw) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(e),
        })
    }
    /// The raw `CUevent`, for an engine to wait on.
    pub fn raw(&self) -> u64 {
        self.raw as usize as u64
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`.
        let _ = call("cuEventDestroy", || unsafe { result::event::destroy(self.raw) });
    }
}

/// A loaded module and the functions we use from it.
pub(crate) struct Module {
    raw: sys::CUmodule,
}

unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    pub fn load(image: &[u8]) -> Result<Module, GpuError> {
        // cuModuleLoadData reads a cubin by its header; copy it to an aligned buffer.
        let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
        // SAFETY: `aligned` holds at least image.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len()) };
        // SAFETY: a complete cubin image.
        let raw = call("cuModuleLoadData", || unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) })?;
        Ok(Module { raw })
    }
    pub fn function(&self, name: &str) -> Result<sys::CUfunction, GpuError> {
        let n = CString::new(name).map_err(|_| GpuError::Invalid("bad kernel name".into()))?;
        // SAFETY: module is loaded.
        call("cuModuleGetFunction", || unsafe { result::module::get_function(self.raw, n) })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded in `load`.
        let _ = call("cuModuleUnload", || unsafe { result::module::unload(self.raw) });
    }
}

/// Launch `f`; `params` are pointers to each argument's value.
///
/// # Safety
/// The arguments must match the kernel's signature and every device address
/// they carry must be valid for what the kernel does with it.
pub(crate) unsafe fn launch(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    stream: &Stream,
    params: &mut [*mut c_void],
) -> Result<(), GpuError> {
    call("cuLaunchKernel", || unsafe { result::launch_kernel(f, grid, block, smem, stream.raw, params) })
}

/// Asynchronous host-to-device copy.
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes; `src` must stay alive and
/// unchanged until the copy completes (pinned memory for true asynchrony).
pub(crate) unsafe fn copy_htod(dst: u64, src: &[u8], s: &Stream) -> Result<(), GpuError> {
    call("cuMemcpyHtoDAsync", || unsafe { result::memcpy_htod_async(dst, src, s.raw) })
}

/// Asynchronous device-to-device copy.
///
/// # Safety
/// Both ranges must be valid device memory.
pub(crate) unsafe fn copy_dtod(dst: u64, src: u64, n: usize, s: &Stream) -> Result<(), GpuError> {
    call("cuMemcpyDtoDAsync", || unsafe { result::memcpy_dtod_async(dst, src, n, s.raw) })
}

/// Asynchronous memset.
///
/// # Safety
/// The range must be valid device memory.
pub(crate) unsafe fn memset(dst: u64, v: u8, n: usize, s: &Stream) -> Result<(), GpuError> {
    call("cuMemsetD8Async", || unsafe { result::memset_d8_async(dst, v, n, s.raw) })
}

pub(crate) fn set_max_dynamic_smem(f: sys::CUfunction, bytes: i32) -> Result<(), GpuError> {
    // SAFETY: f is a loaded function.
    call("cuFuncSetAttribute", || unsafe {
        result::function::set_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
    })
}

/// Asynchronous device-to-host copy.
///
/// # Safety
/// `src` must be valid device memory for `dst.len()` bytes; `dst` must stay
/// alive and untouched until the copy completes (pinned for true asynchrony).
pub(crate) unsafe fn copy_dtoh(dst: &mut [u8], src: u64, s: &Stream) -> Result<(), GpuError> {
    call("cuMemcpyDtoHAsync", || unsafe { result::memcpy_dtoh_async(dst, src, s.raw) })
}

/// The ordinal of the device that owns `ptr`, or `None` when the driver
/// does not know the address as device memory (a host pointer, say).
pub(crate) fn pointer_device(ptr: u64) -> Result<Option<usize>, GpuError> {
    call("cuInit", result::init)?;
    let mut ordinal: i32 = -1;
    // SAFETY: the attribute writes one int into `ordinal`; any address may be asked about.
    let r = call("cuPointerGetAttribute", || {
        let code = unsafe {
            sys::cuPointerGetAttribute(
                &mut ordinal as *mut i32 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr as sys::CUdeviceptr,
            )
        };
        Ok(code)
    })?;
    match r {
        sys::cudaError_enum::CUDA_SUCCESS if ordinal >= 0 => Ok(Some(ordinal as usize)),
        _ => Ok(None),
    }
}
