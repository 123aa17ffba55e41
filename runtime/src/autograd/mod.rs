//! Reverse-mode automatic differentiation over coarse ops.
//!
//! Each op in [`crate::ops`] records a [`GradFn`] holding its inputs and whatever it saved; backward
//! walks the recorded graph in reverse topological order and accumulates gradients of the leaves
//! that asked for them (`Tensor::requires_grad`). Backward itself records nothing.

pub mod gradcheck;

use crate::backend::BackendStorage;
use crate::error::{ensure_shape, Result};
use crate::tensor::{Tensor, TensorId};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

/// The backward half of an op.
pub trait GradFn: Send + Sync {
    /// The op's name (for messages).
    fn name(&self) -> &'static str;
    /// The inputs gradients flow to, in the order `backward` returns them.
    fn inputs(&self) -> Vec<Tensor>;
    /// Gradients of the inputs given the gradient of the output (None: no gradient for that input).
    fn backward(&self, grad_out: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops currently record the graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` without recording gradients (inference, optimizer updates, backward itself).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_grad_enabled(false, f)
}

/// Runs `f` with gradient recording switched on or off, restoring the previous mode afterwards.
pub fn with_grad_enabled<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(enabled)));
    f()
}

/// Gradients of leaves, by tensor identity.
#[derive(Default)]
pub struct Grads(HashMap<TensorId, Tensor>);

impl Grads {
    /// The gradient of `t`, if it received one.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    /// Removes and returns the gradient of `t`.
    pub fn take(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }
    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Adds `other`'s gradients into these (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        no_grad(|| {
            for (id, g) in other.0 {
                let sum = match self.0.remove(&id) {
                    None => g,
                    Some(prev) => crate::ops::add(&prev, &g)?,
                };
                self.0.insert(id, sum);
            }
            Ok(())
        })
    }
    /// √(Σ g²) over every gradient held.
    pub fn global_norm(&self) -> Result<f64> {
        let mut s = 0.0;
        for g in self.0.values() {
            s += g.to_f64_vec()?.iter().map(|v| v * v).sum::<f64>();
        }
        Ok(s.sqrt())
    }
    /// Multiplies every gradient by `c` (clipping).
    pub fn scale(&mut self, c: f64) -> Result<()> {
        no_grad(|| {
            for g in self.0.values_mut() {
                *g = crate::ops::scale(g, c)?;
            }
            Ok(())
        })
    }
}

/// Nodes reachable from `root` through grad_fns, inputs before outputs.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS: (tensor, children pushed?)
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(f) = t.grad_fn() {
            for i in f.inputs() {
                if i.requires_grad_flag() && !seen.contains(&i.id()) {
                    stack.push((i, false));
                }
            }
        }
    }
    order
}

fn accumulate(grads: &mut HashMap<TensorId, Tensor>, t: &Tensor, g: Tensor) -> Result<()> {
    ensure_shape!(
        g.shape() == t.shape(),
        "backward",
        "gradient of shape {:?} for a tensor of shape {:?}",
        g.shape(),
        t.shape()
    );
    match grads.remove(&t.id()) {
        None => {
            grads.insert(t.id(), g);
        }
        Some(prev) => {
            let sum = crate::ops::add(&prev, &g)?;
            grads.insert(t.id(), sum);
        }
    }
    Ok(())
}

/// Backpropagates from the scalar `root` (seed gradient 1).
pub fn backward(root: &Tensor) -> Result<Grads> {
    ensure_shape!(root.elem_count() == 1, "backward", "root must be a scalar, got shape {:?}", root.shape());
    no_grad(|| {
        let order = topo_order(root);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let one = crate::backend::Storage::zeros(root.device(), root.dtype(), 1)?.affine(0.0, 1.0)?;
        grads.insert(root.id(), Tensor::from_storage(one, root.shape())?);
        let mut leaves = HashMap::new();
        for t in order.iter().rev() {
            let Some(f) = t.grad_fn() else {
                if let Some(g) = grads.remove(&t.id()) {
                    leaves.insert(t.id(), g);
                }
                continue;
            };
            let Some(g) = grads.remove(&t.id()) else { continue };
            let inputs = f.inputs();
            let gin = f.backward(&g)?;
            ensure_shape!(gin.len() == inputs.len(), "backward", "{} returned {} gradients for {} inputs", f.name(), gin.len(), inputs.len());
            for (i, gi) in inputs.iter().zip(gin) {
                if let Some(gi) = gi {
                    if i.requires_grad_flag() {
                        accumulate(&mut grads, i, gi)?;
                    }
                }
            }
        }
        Ok(Grads(leaves))
    })
}
