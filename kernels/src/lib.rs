//! CUDA kernel sources of temper and their loader.
//!
//! Every op's kernels live in one `.cu` file under `kernels/cuda/` (forward and backward together,
//! a simple reference kernel beside each fast one, the math in a comment on top). The sources are
//! embedded in the binary with `include_str!` and compiled at first use by NVRTC straight to a
//! CUBIN for the device's own architecture (`sm_XY`), then cached on disk per architecture; see
//! `kernels/README.md` for why this beats shipping PTX. [`compile`] also returns the ptxas
//! resource report (registers, spills) that CI prints for sm_80 and sm_90.
//!
//! Nothing here touches a GPU: compiling needs only NVRTC (`libnvrtc.so.13`) and the CUDA headers,
//! and every entry point first checks that NVRTC can be loaded, so a machine without CUDA gets an
//! error, never a panic.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// One `.cu` file.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// The file stem, also the module name kernels are looked up under.
    pub name: &'static str,
    pub code: &'static str,
}

macro_rules! sources {
    ($($name:literal),+ $(,)?) => {
        &[$(Source { name: $name, code: include_str!(concat!("../cuda/", $name, ".cu")) }),+]
    };
}

/// Every kernel file, in the order CI reports them.
pub const SOURCES: &[Source] = sources!(
    "elementwise",
    "reduce",
    "embedding",
    "rms_norm",
    "rope",
    "swiglu",
    "attention",
    "lora",
    "nf4",
    "cross_entropy",
    "adamw",
);

/// Helpers shared by every file (dtype conversions, 128-bit packs, warp/block reductions); prepended
/// to each source before compilation.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// The source called `name`.
pub fn source(name: &str) -> Option<&'static Source> {
    SOURCES.iter().find(|s| s.name == name)
}

/// Whether NVRTC can be loaded on this machine (a `dlopen` probe; never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library candidates.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let (mut maj, mut min) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) };
    r.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((maj, min))
}

fn no_nvrtc() -> String {
    "NVRTC (libnvrtc.so.13) cannot be loaded: install the CUDA 13.0 toolkit or run scripts/setup-cuda.sh, \
     and put its lib directory on LD_LIBRARY_PATH"
        .to_string()
}

/// Directories holding `cuda_bf16.h`, `mma.h` and libcu++ (`cccl/`), in the order searched:
/// `$TEMPER_CUDA_INCLUDE` (colon-separated), `.cuda-pip/nvidia/cu13/include` of this checkout
/// (what `scripts/setup-cuda.sh` installs), `$CUDA_HOME/include`, `/usr/local/cuda/include`.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("TEMPER_CUDA_INCLUDE") {
        roots.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cuda-pip/nvidia/cu13/include"));
    if let Ok(exe) = std::env::current_exe() {
        // A binary carried to another machine next to its checkout: <repo>/target/release/temper.
        if let Some(repo) = exe.ancestors().nth(3) {
            roots.push(repo.join(".cuda-pip/nvidia/cu13/include"));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            roots.push(PathBuf::from(v).join("include"));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda/include"));
    let mut out = Vec::new();
    for r in roots {
        if r.join("cuda_bf16.h").is_file() && !out.contains(&r) {
            let cccl = r.join("cccl");
            out.push(r);
            if cccl.is_dir() {
                out.push(cccl);
            }
        }
    }
    out
}

/// Resources ptxas reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

/// A compiled file.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The CUBIN for `arch`.
    pub cubin: Vec<u8>,
    /// NVRTC's program log (warnings and the ptxas `-v` report).
    pub log: String,
}

impl Compiled {
    /// Per-kernel registers, spills and shared memory parsed from the ptxas report.
    pub fn resources(&self) -> Vec<Resources> {
        parse_ptxas(&self.log)
    }
}

/// The options every compilation uses (besides the architecture and include paths).
pub const OPTIONS: &[&str] = &["--std=c++17", "-default-device", "-lineinfo", "--ptxas-options=-v"];

/// The full text NVRTC sees for `src`: the common header, then the file with its own line numbers.
pub fn full_source(src: &Source) -> String {
    format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.code)
}

/// Compiles `src` to a CUBIN for `arch` (e.g. `sm_90`). The error carries NVRTC's log.
pub fn compile(src: &Source, arch: &str) -> Result<Compiled, String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let dirs = include_dirs();
    if dirs.is_empty() {
        return Err("the CUDA headers (cuda_bf16.h) were not found: set TEMPER_CUDA_INCLUDE, CUDA_HOME, or run scripts/setup-cuda.sh".into());
    }
    let text = CString::new(full_source(src)).map_err(|_| format!("{}.cu contains a NUL byte", src.name))?;
    let name = CString::new(format!("{}.cu", src.name)).map_err(|_| "bad name".to_string())?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(dirs.iter().map(|d| format!("--include-path={}", d.display())));
    let prog = result::create_program(&text, Some(&name)).map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` was just created and is destroyed once below; `text`/`name` outlive it.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let res = match compiled {
            Err(e) => Err(format!("{}.cu failed to compile for {arch} ({e:?}):\n{log}", src.name)),
            Ok(()) => {
                let mut size = 0usize;
                let mut cubin = Vec::new();
                let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                if r.result().is_ok() && size > 0 {
                    cubin = vec![0u8; size];
                    if sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result().is_err() {
                        cubin.clear();
                    }
                }
                if cubin.is_empty() {
                    Err(format!("{}.cu: NVRTC produced no CUBIN for {arch} (a real architecture such as sm_90 is required)", src.name))
                } else {
                    Ok(Compiled { cubin, log })
                }
            }
        };
        let _ = result::destroy_program(prog);
        res
    };
    out
}

/// Where compiled CUBINs are cached: `$TEMPER_KERNEL_CACHE`, else `$XDG_CACHE_HOME/temper/kernels`,
/// else `~/.cache/temper/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(v) = std::env::var("TEMPER_KERNEL_CACHE") {
        return Some(PathBuf::from(v));
    }
    if let Ok(v) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(v).join("temper/kernels"));
    }
    std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache/temper/kernels"))
}

/// The CUBIN of `src` for `arch`, from the on-disk cache when an entry for this exact source,
/// architecture, option set and NVRTC version exists, else compiled and stored (atomically: a
/// temporary file renamed into place, so concurrent processes never read a partial entry).
pub fn cubin(src: &Source, arch: &str) -> Result<Vec<u8>, String> {
    let version = nvrtc_version()?;
    let mut h = DefaultHasher::new();
    (full_source(src), arch, OPTIONS, version).hash(&mut h);
    let key = format!("{}-{arch}-{:016x}.cubin", src.name, h.finish());
    let path = cache_dir().map(|d| d.join(&key));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let compiled = compile(src, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = dir.join(format!(".{key}.{}", std::process::id()));
                if std::fs::write(&tmp, &compiled.cubin).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
    Ok(compiled.cubin)
}

/// Parses `ptxas info : Compiling entry function 'k' …`, `Used N registers` and `N bytes spill
/// stores, M bytes spill loads` lines into one record per kernel.
pub fn parse_ptxas(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Resources { kernel: name, ..Default::default() });
        } else if let Some(cur) = out.last_mut() {
            if line.contains("spill stores") {
                cur.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                cur.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
            if let Some(r) = num_before(line, "registers") {
                cur.registers = r;
            }
            if let Some(s) = num_before(line, "bytes smem") {
                cur.shared_bytes = s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : Compiling entry function 'rms_norm_fwd_f32' for 'sm_90'\n\
                   ptxas info    : Function properties for rms_norm_fwd_f32\n\
                   ptxas         .     0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 31 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'b' for 'sm_90'\n\
                   ptxas info    : Used 8 registers\n";
        let r = parse_ptxas(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], Resources { kernel: "rms_norm_fwd_f32".into(), registers: 31, spill_stores: 8, spill_loads: 4, shared_bytes: 128 });
        assert_eq!(r[1].registers, 8);
        assert_eq!(r[1].spill_stores, 0);
    }

    #[test]
    fn every_source_is_listed_once() {
        let mut names: Vec<_> = SOURCES.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SOURCES.len());
        for s in SOURCES {
            assert!(s.code.contains("__global__"), "{}.cu has no kernel", s.name);
        }
    }
}
