//! The GPU side of a context: for one CUDA device, the fused decoder (loads
//! into device blocks), the encoder and the gather kernel (stores from device
//! blocks), compiled once and shared by every job on that device.

use std::sync::Arc;

use crate::gpu::{Event, Gpu, GpuDecoder, GpuEncoder, GpuError, GpuGather};

/// One device's kernels.
pub struct DeviceSide {
    pub gpu: Gpu,
    pub decoder: Arc<GpuDecoder>,
    /// Stores of the lossy levels: encoded on the device, byte-identical to
    /// the host encoder.
    pub encoder: GpuEncoder,
    /// Stores the GPU encoder does not take (the lossless level): gathered
    /// on the device, encoded on the host.
    pub gather: GpuGather,
}

impl DeviceSide {
    /// Opens device `ordinal` and compiles the kernels (`GpuError::NoGpu`
    /// on machines without a usable GPU).
    pub fn open(ordinal: usize) -> Result<Arc<DeviceSide>, GpuError> {
        let gpu = Gpu::open(ordinal)?;
        let mut decoder = GpuDecoder::new(&gpu)?;
        // A load is decoded layer by layer, one launch per layer: with the
        // whole request in one batch each launch fills the GPU
        // (docs/BENCHMARKS.md, per-layer events).
        decoder.batch_bytes = usize::MAX;
        let gather = GpuGather::new(&gpu)?;
        let encoder = GpuEncoder::new(&gpu)?;
        Ok(Arc::new(DeviceSide { gpu, decoder: Arc::new(decoder), encoder, gather }))
    }

    /// An event recorded now on the engine's `stream`, so that the job's
    /// device work comes after what the engine enqueued before asking.
    pub fn mark(&self, stream: u64) -> Result<Event, GpuError> {
        crate::gpu::record_on(&self.gpu, stream)
    }
}

/// Where a job's device work runs, and what it must wait for.
pub struct DeviceTarget {
    pub side: Arc<DeviceSide>,
    /// Recorded on the engine's stream when the job was asked for.
    pub after: Option<Event>,
}
