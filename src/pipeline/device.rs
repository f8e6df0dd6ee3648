//! The GPU side of a context: for one CUDA device, the fused decoder (loads
//! into device blocks), the encoder and the gather kernel (stores from device
//! blocks), compiled once and shared by every job on that device.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::codec::TableSet;
use crate::gpu::{Event, Gpu, GpuDecoder, GpuEncoder, GpuError, GpuGather, GpuTableSet};

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
    /// The context's table sets as device lookups, uploaded at first use.
    uploaded: Mutex<HashMap<u64, GpuTableSet>>,
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
        Ok(Arc::new(DeviceSide { gpu, decoder: Arc::new(decoder), encoder, gather, uploaded: Mutex::new(HashMap::new()) }))
    }

    /// `set` on this device, uploaded once (a few MB) and kept for the
    /// context's life.
    pub fn tables(&self, set: &TableSet) -> Result<GpuTableSet, GpuError> {
        let id = set.id();
        let mut up = self.uploaded.lock();
        if let Some(t) = up.get(&id) {
            return Ok(t.clone());
        }
        let t = self.decoder.upload_tables(set)?;
        up.insert(id, t.clone());
        Ok(t)
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
