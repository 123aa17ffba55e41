//! AdamW over a set of parameters, with f32 moment state kept beside each parameter (on its device).
//! The update itself is a backend op (`backend::cpu::adamw`, `backend::cuda::adamw`). On CUDA all
//! parameters of a device are updated by one multi-tensor launch per step, and bf16/f16 parameters
//! train through an f32 master copy that the kernel rounds back into the parameter.

use crate::autograd::Grads;
use crate::backend::{AdamWStep, BackendStorage, Storage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), as `torch.optim.AdamW` computes it.
///
/// ```
/// use temper_runtime::{ops, optim::AdamW, Device, Tensor};
/// let w = Tensor::from_vec(vec![1.0f32, -2.0], &[2], Device::Cpu)?.requires_grad();
/// let mut opt = AdamW::new(vec![w.clone()], 0.1);
/// let grads = ops::sum(&ops::mul(&w, &w)?)?.backward()?;   // d/dw Σw² = 2w
/// opt.step(&grads)?;
/// // The first Adam step moves each weight by lr against the sign of its gradient.
/// let v = w.to_vec::<f32>()?;
/// assert!((v[0] - (1.0 - 0.1 - 0.1 * 0.01)).abs() < 1e-6);
/// # Ok::<(), temper_runtime::Error>(())
/// ```
pub struct AdamW {
    params: Vec<Tensor>,
    /// Per-parameter learning-rate multipliers (LoRA+).
    lr_scales: Vec<f64>,
    m: Vec<Storage>,
    v: Vec<Storage>,
    /// F32 master weights of bf16/f16 parameters (CUDA only), by parameter index.
    master: Vec<Option<Storage>>,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: u64,
}

impl AdamW {
    /// AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    pub fn new(params: Vec<Tensor>, lr: f64) -> AdamW {
        let lr_scales = vec![1.0; params.len()];
        AdamW {
            params,
            lr_scales,
            m: vec![],
            v: vec![],
            master: vec![],
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 0,
        }
    }

    /// AdamW where parameter `i` learns at `lr · scale_i` (its weight decay too, as a torch
    /// parameter group with that learning rate does).
    pub fn with_lr_scales(params: Vec<(Tensor, f64)>, lr: f64) -> AdamW {
        let (params, scales): (Vec<Tensor>, Vec<f64>) = params.into_iter().unzip();
        AdamW { lr_scales: scales, ..AdamW::new(params, lr) }
    }

    /// Settings of an AdamW the trainer builds over the model's trainable parameters.
    pub fn lr(lr: f64) -> AdamWConfig {
        AdamWConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moment estimates and step count, by parameter index: `m.{i}`, `v.{i}` (F32) and `step`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), Tensor::from_vec(vec![self.step as i64], &[1], crate::Device::Cpu)?)];
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            let n = self.params[i].shape();
            out.push((format!("m.{i}"), Tensor::from_storage(m.clone(), n)?));
            out.push((format!("v.{i}"), Tensor::from_storage(v.clone(), n)?));
            if let Some(Some(w)) = self.master.get(i) {
                out.push((format!("master.{i}"), Tensor::from_storage(w.clone(), n)?));
            }
        }
        Ok(out)
    }

    /// Restores [`AdamW::state`] (shapes checked against the parameters; the state moves to each
    /// parameter's device). A bf16/f16 parameter without a saved `master.{i}` starts its master from
    /// the parameter.
    pub fn load_state(&mut self, get: &dyn Fn(&str) -> Result<Option<Tensor>>) -> Result<()> {
        let step = get("step")?.ok_or_else(|| Error::Input("optimizer state has no `step`".into()))?;
        self.step = step.to_vec::<i64>()?[0] as u64;
        let (mut m, mut v, mut master) = (Vec::new(), Vec::new(), Vec::new());
        if self.step > 0 {
            for (i, p) in self.params.iter().enumerate() {
                for (name, dst) in [(format!("m.{i}"), &mut m), (format!("v.{i}"), &mut v)] {
                    let t = get(&name)?.ok_or_else(|| Error::Input(format!("optimizer state has no `{name}`")))?;
                    if t.shape() != p.shape() || t.dtype() != DType::F32 {
                        return Err(Error::Input(format!(
                            "optimizer state `{name}` is {} {:?}, the parameter is {:?}",
                            t.dtype(),
                            t.shape(),
                            p.shape()
                        )));
                    }
                    dst.push(t.to_device(p.device())?.contiguous_storage()?.clone());
                }
                let w = match get(&format!("master.{i}"))? {
                    Some(t) if t.shape() == p.shape() && t.dtype() == DType::F32 => {
                        Some(t.to_device(p.device())?.contiguous_storage()?.clone())
                    }
                    Some(t) => {
                        return Err(Error::Input(format!(
                            "optimizer state `master.{i}` is {} {:?}, the parameter is {:?}",
                            t.dtype(),
                            t.shape(),
                            p.shape()
                        )))
                    }
                    None => None,
                };
                master.push(w);
            }
        }
        (self.m, self.v, self.master) = (m, v, master);
        Ok(())
    }

    /// Bytes of optimizer state (moments and f32 master weights).
    pub fn state_bytes(&self) -> usize {
        self.m.iter().chain(&self.v).chain(self.master.iter().flatten()).map(|s| s.len() * 4).sum()
    }

    /// Creates the moments (zeros on each parameter's device) and the f32 masters of bf16/f16
    /// parameters on CUDA, where missing.
    fn ensure_state(&mut self) -> Result<()> {
        if self.m.is_empty() {
            for p in &self.params {
                self.m.push(Storage::zeros(p.device(), DType::F32, p.elem_count())?);
                self.v.push(Storage::zeros(p.device(), DType::F32, p.elem_count())?);
            }
        }
        self.master.resize_with(self.params.len(), || None);
        for (p, w) in self.params.iter().zip(self.master.iter_mut()) {
            match p.dtype() {
                DType::F32 => *w = None,
                DType::BF16 | DType::F16 if p.device().is_cuda() => {
                    if w.is_none() {
                        *w = Some(p.contiguous_storage()?.to_dtype(DType::F32)?);
                    }
                }
                d => return Err(Error::dtype("adamw", format!("parameter of dtype {d} on {:?} (AdamW keeps f32 weights; bf16/f16 parameters train through an f32 master copy on CUDA)", p.device()))),
            }
        }
        Ok(())
    }

    /// Applies one update from `grads`; parameters without a gradient are left as they are.
    /// CUDA parameters are updated together: one multi-tensor launch per device.
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        self.ensure_state()?;
        self.step += 1;
        let h = AdamWStep {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: self.step,
        };
        let mut on_cuda: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p) else { continue };
            if let crate::Device::Cuda(ord) = p.device() {
                on_cuda.entry(ord).or_default().push(i);
                continue;
            }
            let g = g.contiguous_storage()?;
            let h = AdamWStep { lr: self.lr * self.lr_scales[i], ..h };
            p.storage_mut().adamw_step(&g, &mut self.m[i], &mut self.v[i], &h)?;
        }
        for idx in on_cuda.values() {
            self.cuda_step(idx, grads, &h)?;
        }
        Ok(())
    }

    /// One multi-tensor update of parameters `idx` (all on one CUDA device, each with a gradient).
    fn cuda_step(&mut self, idx: &[usize], grads: &Grads, h: &AdamWStep) -> Result<()> {
        use crate::backend::cuda::adamw::{step_multi, MultiItem};
        let want = |what: &str| Error::Input(format!("adamw: {what} of a CUDA parameter is not on the device"));
        // One handle per storage: a parameter listed twice would take its write lock twice.
        for (k, &i) in idx.iter().enumerate() {
            if idx[..k].iter().any(|&j| self.params[j].same_storage(&self.params[i])) {
                return Err(Error::Input(format!("adamw: parameter {i} shares its storage with an earlier parameter")));
            }
        }
        let gs: Vec<_> =
            idx.iter().map(|&i| grads.get(&self.params[i]).ok_or_else(|| want("gradient"))?.contiguous_storage()).collect::<Result<_>>()?;
        let mut guards: Vec<_> = idx.iter().map(|&i| self.params[i].storage_mut()).collect();
        let mut sel = vec![false; self.params.len()];
        idx.iter().for_each(|&i| sel[i] = true);
        let state = self.m.iter_mut().zip(self.v.iter_mut()).zip(self.master.iter_mut()).enumerate().filter(|(i, _)| sel[*i]);
        let mut items = Vec::with_capacity(idx.len());
        for (((i, ((m, v), w)), guard), g) in state.zip(guards.iter_mut()).zip(&gs) {
            let (Storage::Cuda(m), Storage::Cuda(v), Storage::Cuda(p), Storage::Cuda(g)) = (m, v, &mut **guard, &**g) else {
                return Err(want("state or gradient"));
            };
            let lr = self.lr * self.lr_scales[i];
            let item = match w {
                Some(Storage::Cuda(w)) => MultiItem { param: w, half: Some(p), grad: g, m, v, lr },
                Some(Storage::Cpu(_)) => return Err(want("master weight")),
                None => MultiItem { param: p, half: None, grad: g, m, v, lr },
            };
            items.push(item);
        }
        step_multi(&mut items, h)
    }
}

/// AdamW hyper-parameters, before the parameters are known: `AdamW::lr(2e-4).weight_decay(0.0)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn weight_decay(self, weight_decay: f64) -> Self {
        AdamWConfig { weight_decay, ..self }
    }
    pub fn betas(self, beta1: f64, beta2: f64) -> Self {
        AdamWConfig { beta1, beta2, ..self }
    }
    pub fn eps(self, eps: f64) -> Self {
        AdamWConfig { eps, ..self }
    }
}

impl super::OptimizerConfig for AdamWConfig {
    type Optimizer = AdamW;
    fn build(self, params: Vec<(Tensor, f64)>) -> AdamW {
        let mut o = AdamW::with_lr_scales(params, self.lr);
        (o.beta1, o.beta2, o.eps, o.weight_decay) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        o
    }
}

impl super::Optimizer for AdamW {
    fn step(&mut self, grads: &Grads) -> Result<()> {
        AdamW::step(self, grads)
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        AdamW::state(self)
    }
    fn load_state(&mut self, get: &dyn Fn(&str) -> Result<Option<Tensor>>) -> Result<()> {
        AdamW::load_state(self, get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ops, Device};

    /// Three steps on loss = Σ p³ + Σ c∘p must land where torch.optim.AdamW(lr=0.01, betas=(0.9, 0.99),
    /// eps=1e-6, weight_decay=0.1) lands. Reference printed by torch 2.15 (float32):
    /// `p=[1,-2,0.5,3]; for 3 steps: loss=(p*p*p).sum()+(p*[1,2,3,4]).sum(); backward; step`.
    #[test]
    fn three_steps_match_torch_adamw() {
        let p = Tensor::from_vec(vec![1.0f32, -2.0, 0.5, 3.0], &[4], Device::Cpu).unwrap().requires_grad();
        let c = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[4], Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![p.clone()], 0.01);
        (opt.beta2, opt.eps, opt.weight_decay) = (0.99, 1e-6, 0.1);
        for _ in 0..3 {
            let cube = ops::mul(&ops::mul(&p, &p).unwrap(), &p).unwrap();
            let loss = ops::add(&ops::sum(&cube).unwrap(), &ops::sum(&ops::mul(&p, &c).unwrap()).unwrap()).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let want = [0.967_048_8f32, -2.023_982, 0.468_539_06, 2.961_046];
        for (a, b) in p.to_vec::<f32>().unwrap().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.steps(), 3);
    }

    /// A parameter with lr scale k moves k times as far on the first step (|Δ| = lr·k for Adam).
    #[test]
    fn lr_scales_multiply_the_step() {
        let a = Tensor::from_vec(vec![1.0f32], &[1], Device::Cpu).unwrap().requires_grad();
        let b = Tensor::from_vec(vec![1.0f32], &[1], Device::Cpu).unwrap().requires_grad();
        let mut opt = AdamW::with_lr_scales(vec![(a.clone(), 1.0), (b.clone(), 16.0)], 1e-3);
        opt.weight_decay = 0.0;
        opt.step(&ops::sum(&ops::add(&a, &b).unwrap()).unwrap().backward().unwrap()).unwrap();
        let (da, db) = (1.0 - a.to_vec::<f32>().unwrap()[0], 1.0 - b.to_vec::<f32>().unwrap()[0]);
        assert!((da - 1e-3).abs() < 1e-7 && (db - 16e-3).abs() < 1e-6, "{da} {db}");
    }
}
