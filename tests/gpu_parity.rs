//! Every CUDA kernel against the CPU backend (the suites in runtime/src/backend/cuda/*::parity).
//! Needs a GPU: without one the test says so and passes, unless `REQUIRE_GPU=1`.
//! `temper gpu-check` (scripts/gpu-check.sh) runs the same suites and prints the table.

use temper::backend::cuda;

#[test]
fn every_kernel_matches_the_cpu_backend() {
    if !cuda::available() {
        assert!(std::env::var("REQUIRE_GPU").as_deref() != Ok("1"), "REQUIRE_GPU=1 but no CUDA device is usable: {:?}", cuda::device_count().err());
        eprintln!("skipping: no CUDA device ({})", cuda::device_count().err().map(|e| e.to_string()).unwrap_or_default());
        return;
    }
    let rows = cuda::parity::run_all(0, None, 0).expect("parity run");
    println!("{}", cuda::parity::table(&rows));
    assert!(!rows.is_empty());
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed).map(|r| format!("{} {}: {}", r.kernel, r.case, r.note)).collect();
    assert!(failed.is_empty(), "{} parity failures:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn asking_for_a_missing_gpu_is_an_error_not_a_panic() {
    if cuda::available() {
        return;
    }
    let e = temper::Device::parse("cuda").expect_err("no GPU here");
    assert!(e.to_string().contains("CUDA"), "{e}");
    let e = temper::Tensor::from_vec(vec![1f32], &[1], temper::Device::Cuda(0)).expect_err("no GPU here");
    assert!(e.to_string().contains("CUDA"), "{e}");
    assert!(temper::Device::parse("cuda:x").is_err());
    assert!(temper::Device::parse("tpu").is_err());
}
