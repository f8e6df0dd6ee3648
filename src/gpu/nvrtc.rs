//! Run-time compilation of `cuda/*.cu` with NVRTC, loaded with `dlopen`.
//!
//! We do not use `cudarc::nvrtc`: it looks for `libnvrtc.so` or a CUDA 12 (or
//! older) soname and panics otherwise, while machines with CUDA 13 have
//! `libnvrtc.so.13` only, often outside the loader path. Here the library is
//! found by name or in the usual CUDA and Python-wheel directories
//! (`CACHEGEN_NVRTC=/path/to/libnvrtc.so.N` overrides), and the kernels are
//! compiled to a cubin for the device's exact architecture (`sm_XY`), so the
//! driver does no PTX JIT and a toolkit newer than the driver still works.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;

use super::GpuError;

type Prog = *mut c_void;

// The C signatures of the NVRTC functions used (nvrtc.h).
type CreateFn = unsafe extern "C" fn(*mut Prog, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

struct Api {
    _lib: *mut c_void,
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: GetFn,
    cubin_size: SizeFn,
    cubin: GetFn,
    destroy: DestroyFn,
    version: VersionFn,
}

fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("CACHEGEN_NVRTC") {
        out.push(p);
    }
    for n in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
        out.push(n.to_string());
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = std::env::var(var) {
            dirs.push(PathBuf::from(&h).join("lib64"));
            dirs.push(PathBuf::from(&h).join("lib"));
        }
    }
    for d in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda/targets/sbsa-linux/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"] {
        dirs.push(PathBuf::from(d));
    }
    // Python wheels (nvidia-cuda-nvrtc): <site>/nvidia/{cu13,cuda_nvrtc}/lib.
    for root in ["/usr/local/lib", "/usr/lib"] {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("python3") {
                    for site in ["site-packages", "dist-packages"] {
                        for sub in ["cu13", "cuda_nvrtc", "cu12"] {
                            dirs.push(e.path().join(site).join("nvidia").join(sub).join("lib"));
                        }
                    }
                }
            }
        }
    }
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            let mut found: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("libnvrtc.so") && !n.contains("builtins") && !n.contains("alt"))
                .collect();
            found.sort();
            found.reverse(); // newest soname first
            out.extend(found.into_iter().map(|n| d.join(n).to_string_lossy().to_string()));
        }
    }
    out
}

impl Api {
    fn load() -> Result<Api, GpuError> {
        let tried = candidates();
        for name in &tried {
            let Ok(c) = CString::new(name.as_str()) else { continue };
            // SAFETY: dlopen with a valid C string.
            let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if lib.is_null() {
                continue;
            }
            let sym = |s: &str| -> Result<*mut c_void, GpuError> {
                let cs = CString::new(s).unwrap();
                // SAFETY: lib is an open handle.
                let p = unsafe { libc::dlsym(lib, cs.as_ptr()) };
                if p.is_null() {
                    Err(GpuError::Compile(format!("{name} lacks {s}")))
                } else {
                    Ok(p)
                }
            };
            // SAFETY: the symbols have these C signatures (nvrtc.h).
            unsafe {
                return Ok(Api {
                    _lib: lib,
                    create: std::mem::transmute::<*mut c_void, CreateFn>(sym("nvrtcCreateProgram")?),
                    compile: std::mem::transmute::<*mut c_void, CompileFn>(sym("nvrtcCompileProgram")?),
                    log_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetProgramLogSize")?),
                    log: std::mem::transmute::<*mut c_void, GetFn>(sym("nvrtcGetProgramLog")?),
                    cubin_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetCUBINSize")?),
                    cubin: std::mem::transmute::<*mut c_void, GetFn>(sym("nvrtcGetCUBIN")?),
                    destroy: std::mem::transmute::<*mut c_void, DestroyFn>(sym("nvrtcDestroyProgram")?),
                    version: std::mem::transmute::<*mut c_void, VersionFn>(sym("nvrtcVersion")?),
                });
            }
        }
        Err(GpuError::Compile(format!("NVRTC not found (set CACHEGEN_NVRTC); tried {}", tried.join(", "))))
    }
}

/// NVRTC's version, e.g. (12, 9).
pub fn version() -> Result<(i32, i32), GpuError> {
    let api = Api::load()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: valid out-pointers.
    unsafe { (api.version)(&mut a, &mut b) };
    Ok((a, b))
}

/// Compile `src` to a cubin for `sm_{major}{minor}`. Returns the cubin and
/// the compiler log.
pub fn compile(src: &str, name: &str, major: i32, minor: i32, extra: &[String]) -> Result<(Vec<u8>, String), GpuError> {
    let api = Api::load()?;
    let csrc = CString::new(src).map_err(|_| GpuError::Compile("source contains NUL".into()))?;
    let cname = CString::new(name).unwrap();
    let mut prog: Prog = std::ptr::null_mut();
    // SAFETY: valid strings, no headers.
    let r = unsafe { (api.create)(&mut prog, csrc.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
    if r != 0 {
        return Err(GpuError::Compile(format!("nvrtcCreateProgram failed ({r})")));
    }
    let opts: Vec<CString> = [format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".into(), "-default-device".into(), "-lineinfo".into()]
        .into_iter()
        .chain(extra.iter().cloned())
        .filter_map(|s| CString::new(s).ok())
        .collect();
    let ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: prog was created; options are valid C strings.
    let r = unsafe { (api.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
    let mut n = 0usize;
    // SAFETY: prog is valid.
    unsafe { (api.log_size)(prog, &mut n) };
    let mut log = vec![0u8; n.max(1)];
    // SAFETY: log has n bytes.
    unsafe { (api.log)(prog, log.as_mut_ptr() as *mut c_char) };
    let log = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().to_string()).unwrap_or_default();
    let out = if r != 0 {
        Err(GpuError::Compile(format!("{name} for sm_{major}{minor}: {log}")))
    } else {
        let mut size = 0usize;
        // SAFETY: compiled program.
        unsafe { (api.cubin_size)(prog, &mut size) };
        let mut bin = vec![0u8; size];
        // SAFETY: bin has `size` bytes.
        let r = unsafe { (api.cubin)(prog, bin.as_mut_ptr() as *mut c_char) };
        if r != 0 || size == 0 {
            Err(GpuError::Compile(format!("nvrtcGetCUBIN failed ({r})")))
        } else {
            Ok((bin, log))
        }
    };
    // SAFETY: destroy once.
    unsafe { (api.destroy)(&mut prog) };
    out
}
