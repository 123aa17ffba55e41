//! bitsandbytes-compatible 4-bit quantisation (NF4 and FP4), byte for byte: the code tables and
//! their quantisers ([`codes`]), blockwise quantise/dequantise with double quantisation of the
//! scales ([`blockwise`]), and the serialized per-layer state of a pre-quantised HF checkpoint
//! ([`state`]). The layout is specified in docs `peers.md` §4: row-major flat blocks, one f32
//! absmax per block, element 2j in the high nibble.

pub mod blockwise;
pub mod codes;
pub mod state;
pub mod weight;

pub use blockwise::{dequantize_4bit, double_dequantize, double_quantize, quantize_4bit};
pub use codes::QuantType;
pub use state::{Absmax, Nf4Weight, QuantState};
pub use weight::{compare_weights, Bnb4bitConfig, QuantizedWeight, WeightDiff};
