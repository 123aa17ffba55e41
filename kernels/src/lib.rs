//! CUDA kernel sources of temper; they arrive with the CUDA backend issue.
