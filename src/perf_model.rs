//! The FLOP/byte model of one training step: for every kernel of a LoRA, QLoRA or full fine-tune
//! step of a Llama shape, the FLOPs it must do and the bytes it must move at least, and from them
//! the floor each kernel can reach on a card (`max(FLOPs / peak, bytes / bandwidth)`), the step's
//! predicted floor, and the memory plan (what is resident and what the step saves for backward).
//!
//! These are predictions, made before measuring: `temper bench --workload model` prints them, and
//! `scripts/gpu-bench.sh` prints them beside the measured step with the card's measured GEMM
//! ceiling as the peak. Counting conventions:
//! - a GEMM `[m,k]·[k,n]` is `2mkn` FLOPs and reads both operands and writes the output once;
//! - causal attention forward is `4·b·h·s²·d / 2` FLOPs (the masked half is skipped), backward
//!   2.5× that (five products instead of two, S recomputed); it reads Q, K, V (and O, dO, LSE)
//!   once and writes O (dQ, dK, dV) once, as a flash kernel does;
//! - elementwise kernels (norms, RoPE, SwiGLU, residual adds, casts) are pure bytes;
//! - AdamW reads bf16 weight and gradient and f32 master, m and v, and writes all but the gradient.
//!
//! All activations are bf16 (2 bytes); a QLoRA base is NF4 (half a byte per weight plus one f32
//! scale per 64, decoded from double quantisation at load) dequantised to a bf16 scratch per
//! layer before its GEMM, as the CUDA backend does above 512 rows.

use temper_runtime::formats::hf_config::ModelConfig;

/// A card's ceilings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Card {
    /// Dense bf16 tensor-core throughput, TFLOP/s.
    pub peak_tflops: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
}

impl Card {
    /// NVIDIA H100 SXM5 80 GB datasheet figures (dense bf16, HBM3).
    pub const H100_SXM: Card = Card { peak_tflops: 989.0, bandwidth_gbs: 3350.0 };
}

/// Which weights a step trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// LoRA on all seven projections over a frozen bf16 base.
    LoraBf16,
    /// The same LoRA over a frozen NF4 base.
    QloraNf4,
    /// Every weight, AdamW with f32 masters.
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::LoraBf16 => "LoRA (bf16 base)",
            Mode::QloraNf4 => "QLoRA (NF4 base)",
            Mode::Full => "full fine-tune",
        }
    }
}

/// One kernel (or one kind of kernel summed over the layers) of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: &'static str,
    /// Launches per step.
    pub calls: usize,
    pub flops: f64,
    pub bytes: f64,
}

impl Kernel {
    /// The least time this kernel can take on `card`, in milliseconds.
    pub fn floor_ms(&self, card: &Card) -> f64 {
        1e3 * (self.flops / (card.peak_tflops * 1e12)).max(self.bytes / (card.bandwidth_gbs * 1e9))
    }

    /// Whether the floor is set by compute or by memory on `card`.
    pub fn bound(&self, card: &Card) -> &'static str {
        if self.flops / (card.peak_tflops * 1e12) >= self.bytes / (card.bandwidth_gbs * 1e9) {
            "compute"
        } else {
            "memory"
        }
    }
}

/// Bytes a step needs resident, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// Base (and trained) weights as stored on the device.
    pub weights: f64,
    /// Gradients, f32 masters and AdamW moments of what trains.
    pub training_state: f64,
    /// Activations the forward saves for the backward.
    pub saved_activations: f64,
    /// Saved activations under gradient checkpointing: each layer's input, plus one layer's full
    /// set while that layer is recomputed in the backward.
    pub saved_checkpointed: f64,
    /// The largest transient workspace: the cross-entropy chunk of logits and its f32 accumulator,
    /// the NF4 dequantisation scratch, the cuBLASLt workspace.
    pub workspace: f64,
}

impl MemoryPlan {
    pub fn total(&self) -> f64 {
        self.weights + self.training_state + self.saved_activations + self.workspace
    }
}

/// The model of one step of a shape.
#[derive(Clone, Debug)]
pub struct StepModel {
    pub config: ModelConfig,
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
}

const BF16: f64 = 2.0;

impl StepModel {
    pub fn new(config: &ModelConfig, batch: usize, seq: usize, rank: usize) -> StepModel {
        StepModel { config: config.clone(), batch, seq, rank }
    }

    fn tokens(&self) -> f64 {
        (self.batch * self.seq) as f64
    }

    /// The decoder's seven linear layers as (name, in, out).
    fn linears(&self) -> [(&'static str, usize, usize); 7] {
        let c = &self.config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        [("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d), ("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)]
    }

    /// Parameters of the decoder's linear layers, of everything, and of the LoRA adapters.
    pub fn params(&self) -> (f64, f64, f64) {
        let c = &self.config;
        let l = c.num_hidden_layers as f64;
        let lin: f64 = self.linears().iter().map(|&(_, i, o)| (i * o) as f64).sum::<f64>() * l;
        let embed = (c.vocab_size * c.hidden_size) as f64;
        let norms = (c.hidden_size * (2 * c.num_hidden_layers + 1)) as f64;
        let total = lin + embed * if c.tie_word_embeddings { 1.0 } else { 2.0 } + norms;
        let lora: f64 = self.linears().iter().map(|&(_, i, o)| (self.rank * (i + o)) as f64).sum::<f64>() * l;
        (lin, total, lora)
    }

    /// FLOPs of the model itself per step (the MFU numerator): `6·N·T` for a full fine-tune and
    /// `4·N·T` when the base is frozen (no weight gradients), N the matmul parameters (decoder
    /// linears and the output projection), plus causal attention's `6·L·T·s·h·d` (training:
    /// 3 × the forward's `2·T·s·h·d` after halving for the mask).
    pub fn model_flops(&self, mode: Mode) -> f64 {
        let c = &self.config;
        let (lin, _, lora) = self.params();
        let n = lin + (c.vocab_size * c.hidden_size) as f64;
        let t = self.tokens();
        let per = if mode == Mode::Full { 6.0 } else { 4.0 };
        let attn = 6.0 * c.num_hidden_layers as f64 * t * self.seq as f64 * (c.num_attention_heads * c.head_dim) as f64;
        per * n * t + if mode == Mode::Full { 0.0 } else { 6.0 * lora * t } + attn
    }

    /// Every kernel of one step in `mode`, summed over layers.
    pub fn kernels(&self, mode: Mode) -> Vec<Kernel> {
        let c = &self.config;
        let (t, l) = (self.tokens(), c.num_hidden_layers);
        let lf = l as f64;
        let (d, f, r) = (c.hidden_size as f64, c.intermediate_size as f64, self.rank as f64);
        let (hq, hkv) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
        let gemm = |m: f64, k: f64, n: f64| (2.0 * m * k * n, BF16 * (m * k + k * n + m * n));
        let mut ks: Vec<Kernel> = Vec::new();
        let mut add = |name: &'static str, calls: usize, (flops, bytes): (f64, f64)| ks.push(Kernel { name, calls, flops, bytes });
        let sum = |parts: &[(f64, f64)]| parts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
        let lin = self.linears();
        let base_fwd = sum(&lin.map(|(_, i, o)| gemm(t, i as f64, o as f64)));
        add("base GEMMs (forward)", 7 * l, (base_fwd.0 * lf, base_fwd.1 * lf));
        add("base GEMMs dX (backward)", 7 * l, (base_fwd.0 * lf, base_fwd.1 * lf));
        if mode == Mode::Full {
            add("base GEMMs dW (backward)", 7 * l, (base_fwd.0 * lf, base_fwd.1 * lf));
        } else {
            // Forward: x·Aᵀ, then (xa)·Bᵀ accumulated into y (β = 1: y read and written).
            let fwd = sum(&lin.map(|(_, i, o)| {
                let (i, o) = (i as f64, o as f64);
                let a = gemm(t, i, r);
                (a.0 + 2.0 * t * r * o, a.1 + BF16 * (t * r + r * o + 2.0 * t * o))
            }));
            add("LoRA GEMMs (forward)", 14 * l, (fwd.0 * lf, fwd.1 * lf));
            // Backward: dxa = dy·B, dB = dyᵀ·xa, dA = dxaᵀ·x, dx += dxa·A.
            let bwd = sum(&lin.map(|(_, i, o)| {
                let (i, o) = (i as f64, o as f64);
                let p = [gemm(t, o, r), gemm(o, t, r), gemm(r, t, i), gemm(t, r, i)];
                (p.iter().map(|x| x.0).sum::<f64>(), p.iter().map(|x| x.1).sum::<f64>() + BF16 * t * i)
            }));
            add("LoRA GEMMs (backward)", 28 * l, (bwd.0 * lf, bwd.1 * lf));
        }
        if mode == Mode::QloraNf4 {
            // Dequantise each NF4 weight to a bf16 scratch, once in the forward and once for dX.
            let w: f64 = lin.iter().map(|&(_, i, o)| (i * o) as f64).sum();
            add("NF4 dequantise", 14 * l, (0.0, 2.0 * lf * w * (0.5 + 1.0 / 16.0 + BF16)));
        }
        let (b, s) = (self.batch as f64, self.seq as f64);
        let attn_fwd = 4.0 * b * c.num_attention_heads as f64 * s * s * c.head_dim as f64 / 2.0;
        add("attention forward", l, (attn_fwd * lf, lf * BF16 * t * (2.0 * hq + 2.0 * hkv)));
        add("attention backward", l, (2.5 * attn_fwd * lf, lf * BF16 * t * (4.0 * hq + 4.0 * hkv)));
        // Elementwise, forward + backward: two RMSNorms, RoPE on q and k, SwiGLU, two residual adds.
        let norm = 2.0 * lf * BF16 * t * d * (2.0 + 3.0);
        add("RMSNorm fwd + bwd", 4 * l + 2, (0.0, norm + BF16 * t * d * 5.0));
        add("RoPE fwd + bwd", 4 * l, (0.0, 2.0 * lf * BF16 * t * (hq + hkv) * 2.0));
        add("SwiGLU fwd + bwd", 2 * l, (0.0, lf * BF16 * t * f * (3.0 + 5.0)));
        add("residual adds + grad sums", 6 * l, (0.0, 6.0 * lf * BF16 * t * d * 3.0));
        // Output projection fused with cross-entropy: forward, backward recomputes the logits.
        let v = c.vocab_size as f64;
        let head = gemm(t, d, v);
        let head_calls = if mode == Mode::Full { 4 } else { 3 };
        add("LM head + cross-entropy", head_calls + 4, (head.0 * head_calls as f64, head.1 * head_calls as f64 + 3.0 * BF16 * t * v));
        add("embedding fwd (+ bwd)", if mode == Mode::Full { 2 } else { 1 }, (0.0, BF16 * t * d * if mode == Mode::Full { 3.0 } else { 1.0 }));
        let (_, total, lora) = self.params();
        let trained = if mode == Mode::Full { total } else { lora };
        add("AdamW (multi-tensor)", 1, (10.0 * trained, trained * (2.0 * BF16 + 3.0 * 4.0 + BF16 + 3.0 * 4.0)));
        ks
    }

    /// Bytes one decoder layer saves for the backward per token, activations of `elem` bytes: the
    /// residual input and normed input of both blocks (4d), q/k/v after RoPE and the attention
    /// output (2hq + 2hkv), gate, up and their SwiGLU product (3f), each LoRA's x·Aᵀ (7r); plus
    /// the attention LSE (f32 per head) and two f32 rstd. Nothing else: adds, scales and RoPE keep
    /// only their inputs' shapes (`Tensor::edge`).
    pub fn saved_per_token_layer(&self, mode: Mode, elem: f64) -> f64 {
        let c = &self.config;
        let (d, f, r) = (c.hidden_size as f64, c.intermediate_size as f64, self.rank as f64);
        let (hq, hkv) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
        let lora_saved = if mode == Mode::Full { 0.0 } else { 7.0 * r };
        elem * (4.0 * d + 2.0 * hq + 2.0 * hkv + 3.0 * f + lora_saved) + 4.0 * (c.num_attention_heads as f64 + 2.0)
    }

    /// What a step in `mode` holds on the device at its peak.
    pub fn memory(&self, mode: Mode) -> MemoryPlan {
        let c = &self.config;
        let t = self.tokens();
        let (lin, total, lora) = self.params();
        let (d, v) = (c.hidden_size as f64, c.vocab_size as f64);
        let weights = match mode {
            Mode::QloraNf4 => lin * (0.5 + 1.0 / 16.0) + (total - lin) * BF16 + lora * BF16,
            Mode::LoraBf16 => (total + lora) * BF16,
            Mode::Full => total * BF16,
        };
        // Gradient (bf16) + f32 master + two f32 moments per trained value.
        let trained = if mode == Mode::Full { total } else { lora };
        let training_state = trained * (BF16 + 4.0 + 8.0);
        let per_token_layer = self.saved_per_token_layer(mode, BF16);
        let saved_activations = t * (c.num_hidden_layers as f64 * per_token_layer + BF16 * 2.0 * d);
        let chunk = temper_runtime::ops::linear_ce_default_chunk(self.batch * self.seq, c.vocab_size) as f64;
        let largest_linear = self.linears().iter().map(|&(_, i, o)| (i * o) as f64).fold(0.0, f64::max);
        let nf4_scratch = if mode == Mode::QloraNf4 { BF16 * largest_linear } else { 0.0 };
        let workspace = t * chunk.min(v) * BF16 + t * d * 4.0 + nf4_scratch + (32 << 20) as f64;
        let saved_checkpointed = t * (c.num_hidden_layers as f64 * BF16 * d + per_token_layer + BF16 * 2.0 * d);
        MemoryPlan { weights, training_state, saved_activations, saved_checkpointed, workspace }
    }

    /// One greedy decode step (one new token for each of `batch` rows, `ctx` tokens already in the
    /// KV cache) in bf16: every weight is read once per step whatever the batch, so batch 1 is
    /// bound by memory and the batch amortises it.
    pub fn decode_step(&self, batch: usize, ctx: usize) -> Vec<Kernel> {
        let c = &self.config;
        let (b, l) = (batch as f64, c.num_hidden_layers as f64);
        let (d, v) = (c.hidden_size as f64, c.vocab_size as f64);
        let hkv = (c.num_key_value_heads * c.head_dim) as f64;
        let (lin, _, _) = self.params();
        let io: f64 = self.linears().iter().map(|&(_, i, o)| (i + o) as f64).sum();
        let mut ks = vec![Kernel { name: "decoder GEMMs (weights read once)", calls: 7 * c.num_hidden_layers, flops: 2.0 * b * lin, bytes: BF16 * (lin + b * l * io) }];
        let attn_flops = 4.0 * b * (c.num_attention_heads * c.head_dim) as f64 * ctx as f64 * l;
        ks.push(Kernel { name: "decode attention (KV read)", calls: c.num_hidden_layers, flops: attn_flops, bytes: BF16 * b * ctx as f64 * 2.0 * hkv * l });
        ks.push(Kernel { name: "norms, RoPE, SwiGLU, adds, KV write", calls: 8 * c.num_hidden_layers, flops: 0.0, bytes: BF16 * b * l * (12.0 * d + 3.0 * c.intermediate_size as f64 + 2.0 * hkv) });
        ks.push(Kernel { name: "LM head + argmax", calls: 2, flops: 2.0 * b * d * v, bytes: BF16 * (d * v + b * v) });
        ks
    }

    /// The printed model of all three modes on `card`.
    pub fn report(&self, card: &Card) -> String {
        use std::fmt::Write;
        let c = &self.config;
        let (_, total, lora) = self.params();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "FLOP/byte model: hidden {}, {} layers, {}/{} heads × {}, intermediate {}, vocabulary {}; batch {} × seq {}; LoRA r {}",
            c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size, self.batch, self.seq, self.rank
        );
        let _ = writeln!(s, "parameters {:.3} B, LoRA {:.2} M; card: {:.0} TFLOP/s bf16, {:.0} GB/s (predictions, not measurements)", total / 1e9, lora / 1e6, card.peak_tflops, card.bandwidth_gbs);
        for mode in [Mode::LoraBf16, Mode::QloraNf4, Mode::Full] {
            let ks = self.kernels(mode);
            let _ = writeln!(s, "\n{}", mode.name());
            let _ = writeln!(s, "  {:<28} {:>7} {:>10} {:>9} {:>9} {:>10}  bound", "kernel", "calls", "GFLOP", "GB", "FLOP/B", "floor ms");
            let (mut fl, mut by, mut ms, mut calls) = (0.0, 0.0, 0.0, 0);
            for k in &ks {
                let _ = writeln!(s, "  {:<28} {:>7} {:>10.1} {:>9.3} {:>9.1} {:>10.3}  {}", k.name, k.calls, k.flops / 1e9, k.bytes / 1e9, k.flops / k.bytes.max(1.0), k.floor_ms(card), k.bound(card));
                fl += k.flops;
                by += k.bytes;
                ms += k.floor_ms(card);
                calls += k.calls;
            }
            let mf = self.model_flops(mode);
            let _ = writeln!(s, "  {:<28} {:>7} {:>10.1} {:>9.3} {:>9.1} {:>10.3}", "step", calls, fl / 1e9, by / 1e9, fl / by, ms);
            let _ =
                writeln!(s, "  floor {:.2} ms/step → at most {:.0} tokens/s; model FLOPs {:.1} G/step ({:.1}% of the work counted above)", ms, self.tokens() / (ms * 1e-3), mf / 1e9, 100.0 * mf / fl);
            let m = self.memory(mode);
            let gib = |x: f64| x / (1u64 << 30) as f64;
            let _ = writeln!(
                s,
                "  memory plan {:.2} GiB: weights {:.2}, training state {:.2}, saved activations {:.2}, workspace {:.2}; with gradient checkpointing {:.2} GiB",
                gib(m.total()),
                gib(m.weights),
                gib(m.training_state),
                gib(m.saved_activations),
                gib(m.workspace),
                gib(m.total() - m.saved_activations + m.saved_checkpointed)
            );
        }
        let _ = writeln!(s, "\ngreedy generation, bf16, one decode step at 80 tokens of context (16-token prompt + 128 new, on average)");
        for batch in [1usize, 32] {
            let ks = self.decode_step(batch, 80);
            let ms: f64 = ks.iter().map(|k| k.floor_ms(card)).sum();
            let calls: usize = ks.iter().map(|k| k.calls).sum();
            let gb: f64 = ks.iter().map(|k| k.bytes).sum::<f64>() / 1e9;
            let _ = writeln!(s, "  batch {batch:>2}: {calls} kernels, {gb:.3} GB moved, floor {ms:.3} ms/step → at most {:.0} tokens/s", batch as f64 / (ms * 1e-3));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> StepModel {
        StepModel::new(&crate::bench::shape("llama-1b").unwrap().config, 1, 2048, 16)
    }

    #[test]
    fn full_step_counts_six_n_t_plus_attention() {
        // A full step's GEMM FLOPs are 3 × forward (forward, dX, dW) over the decoder linears and
        // the LM head, plus the fused cross-entropy's recomputed logits in the backward (one more
        // LM-head forward); the attention kernels add 3.5 × the causal forward.
        let m = shape();
        let ks = m.kernels(Mode::Full);
        let gemm: f64 = ks.iter().filter(|k| k.name.contains("GEMM") || k.name.contains("LM head")).map(|k| k.flops).sum();
        let (lin, total, _) = m.params();
        let n = lin + 32000.0 * 2048.0;
        let want = 6.0 * n * 2048.0 + 2.0 * 2048.0 * 2048.0 * 32000.0;
        assert!((gemm - want).abs() / gemm < 1e-12, "{gemm} vs {want}");
        assert!((total / 1e9 - 0.8535).abs() < 1e-3, "1B shape has {total} parameters");
        let attn: f64 = ks.iter().filter(|k| k.name.starts_with("attention")).map(|k| k.flops).sum();
        assert!((attn - 3.5 * 16.0 * 4.0 * 32.0 * 2048.0 * 2048.0 * 64.0 / 2.0).abs() < 1.0);
    }

    #[test]
    fn lora_skips_weight_gradients_and_qlora_shrinks_weights() {
        let m = shape();
        let full: f64 = m.kernels(Mode::Full).iter().map(|k| k.flops).sum();
        let lora: f64 = m.kernels(Mode::LoraBf16).iter().map(|k| k.flops).sum();
        assert!(lora < 0.8 * full && lora > 0.6 * full, "LoRA {lora} vs full {full}");
        let (ml, mq, mf) = (m.memory(Mode::LoraBf16), m.memory(Mode::QloraNf4), m.memory(Mode::Full));
        assert!(mq.weights < 0.45 * ml.weights, "{mq:?} vs {ml:?}");
        assert!(mf.training_state > 10.0 * ml.training_state);
        // A floor is never below either ceiling's time.
        let k = &m.kernels(Mode::LoraBf16)[0];
        assert!(k.floor_ms(&Card::H100_SXM) >= 1e3 * k.flops / 989e12);
        assert!(m.report(&Card::H100_SXM).contains("QLoRA (NF4 base)"));
        // Decoding at batch 1 is bound by reading the weights: the floor is their bytes over the
        // bandwidth, within the few percent the activations and KV cache add.
        let (lin, _, _) = m.params();
        let weights = 2.0 * (lin + 32000.0 * 2048.0);
        let floor: f64 = m.decode_step(1, 80).iter().map(|k| k.floor_ms(&Card::H100_SXM)).sum();
        let bound = 1e3 * weights / 3350e9;
        assert!(floor >= bound && floor < 1.05 * bound, "{floor} ms vs {bound} ms");
    }
}
