//! Kernel parity against the CPU backend: every CUDA op runs on fresh random inputs and its output
//! is compared with the CPU backend's on the same inputs (bf16 inputs are rounded first, and the
//! CPU computes on the rounded values in f32). Outputs are poisoned (NaN bytes) before each kernel,
//! so an element a kernel never writes fails the check; NaN never passes.
//!
//! The error measure is normwise: `max|gpu − cpu| / max|cpu|`, tolerance 1e-4 for f32 and 1e-2 for
//! bf16. `temper gpu-check` and `tests/gpu_parity.rs` run [`run_all`] and print its table.

use super::device::{available, set_poison_outputs};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use crate::Device;

/// One comparison.
#[derive(Clone, Debug)]
pub struct ParityRow {
    /// The kernel file and op, e.g. `rms_norm/backward dx`.
    pub kernel: String,
    /// The case: shape and options.
    pub case: String,
    pub dtype: DType,
    pub max_abs: f64,
    pub rel: f64,
    pub tol: f64,
    pub passed: bool,
    /// Why it failed (NaN, error, unwritten output), empty when it passed.
    pub note: String,
}

/// The harness handed to each op's `parity` function.
pub struct Parity {
    /// The CUDA device under test.
    pub dev: Device,
    pub rng: Rng,
    pub rows: Vec<ParityRow>,
}

/// The default tolerance of a dtype.
pub fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F64 => 1e-10,
        _ => 1e-2,
    }
}

impl Parity {
    /// Normal(0, 1)·`scale` values of `shape` on the CPU, rounded through `dtype` (returned in
    /// `dtype`; call `.to_dtype(F32)` for the CPU reference).
    pub fn randn(&mut self, shape: &[usize], dtype: DType, scale: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.rng.normal() * scale) as f32).collect();
        Tensor::from_vec(v, shape, Device::Cpu)?.to_dtype(dtype)
    }

    /// Uniform integers in `0..hi` as U32.
    pub fn ids(&mut self, shape: &[usize], hi: u64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<u32> = (0..n).map(|_| self.rng.below(hi) as u32).collect();
        Tensor::from_vec(v, shape, Device::Cpu)
    }

    /// `t` on the device under test.
    pub fn gpu(&self, t: &Tensor) -> Result<Tensor> {
        t.to_device(self.dev)
    }

    /// Compares a device result with the CPU reference using the dtype's default tolerance.
    pub fn check(&mut self, kernel: &str, case: &str, cpu: &Tensor, gpu: &Tensor) {
        let tol = tolerance(gpu.dtype());
        self.check_tol(kernel, case, cpu, gpu, tol)
    }

    /// Compares with an explicit tolerance.
    pub fn check_tol(&mut self, kernel: &str, case: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
        let dtype = gpu.dtype();
        let row = match (cpu.to_f64_vec(), gpu.to_f64_vec()) {
            (Ok(c), Ok(g)) if c.len() == g.len() && cpu.shape() == gpu.shape() => {
                let scale = c.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
                let mut max_abs = 0f64;
                let mut nan = 0usize;
                for (x, y) in c.iter().zip(&g) {
                    if !y.is_finite() && x.is_finite() || y.is_nan() {
                        nan += 1;
                    } else if x.is_finite() {
                        max_abs = max_abs.max((x - y).abs());
                    }
                }
                let rel = if nan > 0 { f64::NAN } else { max_abs / scale };
                let passed = nan == 0 && rel <= tol;
                let note = if nan > 0 { format!("{nan} non-finite or unwritten element(s)") } else { String::new() };
                ParityRow { kernel: kernel.into(), case: case.into(), dtype, max_abs, rel, tol, passed, note }
            }
            (Ok(_), Ok(_)) => ParityRow {
                kernel: kernel.into(),
                case: case.into(),
                dtype,
                max_abs: f64::NAN,
                rel: f64::NAN,
                tol,
                passed: false,
                note: format!("shape {:?} on the device vs {:?} on the CPU", gpu.shape(), cpu.shape()),
            },
            (Err(e), _) | (_, Err(e)) => self.error_row(kernel, case, dtype, &e),
        };
        self.rows.push(row);
    }

    /// Records a failure (an op that returned an error).
    pub fn fail(&mut self, kernel: &str, case: &str, dtype: DType, e: &Error) {
        let row = self.error_row(kernel, case, dtype, e);
        self.rows.push(row);
    }

    fn error_row(&self, kernel: &str, case: &str, dtype: DType, e: &Error) -> ParityRow {
        ParityRow { kernel: kernel.into(), case: case.into(), dtype, max_abs: f64::NAN, rel: f64::NAN, tol: tolerance(dtype), passed: false, note: e.to_string() }
    }
}

/// The CUDA storage of a device tensor (a contiguous copy), for calling backend functions directly.
pub fn cuda_of(t: &Tensor) -> Result<super::CudaStorage> {
    let s = t.contiguous_storage()?;
    match &*s {
        crate::backend::Storage::Cuda(c) => c.try_clone(),
        crate::backend::Storage::Cpu(_) => Err(Error::Input("parity: expected a CUDA tensor".into())),
    }
}

/// A device result as a tensor of `shape`.
pub fn wrap(s: super::CudaStorage, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(crate::backend::Storage::Cuda(s), shape)
}

/// An op's parity cases.
type Suite = fn(&mut Parity) -> Result<()>;

/// Every op's parity suite, in kernel-file order.
pub fn suites() -> Vec<(&'static str, Suite)> {
    vec![
        ("gemm", super::gemm::parity),
        ("elementwise", super::elementwise::parity),
        ("reduce", super::reduce::parity),
        ("embedding", super::embedding::parity),
        ("rms_norm", super::rms_norm::parity),
        ("rope", super::rope::parity),
        ("swiglu", super::swiglu::parity),
        ("attention", super::attention::parity),
        ("lora", super::lora::parity),
        ("nf4", super::nf4::parity),
        ("cross_entropy", super::cross_entropy::parity),
        ("adamw", super::adamw::parity),
    ]
}

/// Runs every suite whose name contains `filter` on `cuda:ordinal`. A suite that returns an error
/// adds a failed row and the others still run.
pub fn run_all(ordinal: usize, filter: Option<&str>, seed: u64) -> Result<Vec<ParityRow>> {
    if !available() {
        return Err(Error::Unsupported("no CUDA device: kernel parity needs a GPU".into()));
    }
    super::CudaDevice::get(ordinal)?;
    set_poison_outputs(true);
    let mut p = Parity { dev: Device::Cuda(ordinal), rng: Rng::new(seed), rows: Vec::new() };
    for (name, suite) in suites() {
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        if let Err(e) = suite(&mut p) {
            p.fail(name, "suite aborted", DType::F32, &e);
        }
    }
    set_poison_outputs(false);
    Ok(p.rows)
}

/// The rows as one aligned text table, with a summary line.
pub fn table(rows: &[ParityRow]) -> String {
    let mut s = format!("{:<34} {:<36} {:<5} {:>10} {:>10} {:>8}  {}\n", "kernel", "case", "dtype", "max|Δ|", "rel", "tol", "result");
    for r in rows {
        s += &format!(
            "{:<34} {:<36} {:<5} {:>10.2e} {:>10.2e} {:>8.0e}  {}{}\n",
            r.kernel,
            r.case,
            r.dtype.to_string(),
            r.max_abs,
            r.rel,
            r.tol,
            if r.passed { "ok" } else { "FAIL" },
            if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) }
        );
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    s += &format!("{} checks, {} passed, {} failed\n", rows.len(), rows.len() - failed, failed);
    s
}
