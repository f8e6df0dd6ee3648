//! GPU path (issue 5): device memory, CUDA kernels compiled from `cuda/`,
//! streams and events. Everything CUDA lives here.
