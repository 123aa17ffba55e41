//! Views and copies: reshape, transpose, narrow, and a contiguous copy. Gradients are the inverse
//! view (reshape back, transpose back) or a scatter into zeros (narrow).

use super::output;
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, Storage};
use crate::error::Result;
use crate::tensor::{Layout, Tensor};
use std::sync::Arc;

struct ReshapeBackward {
    a: Tensor,
}
impl GradFn for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(reshape(&g.contiguous()?, self.a.shape())?)])
    }
}

/// The same elements with another shape (a view when contiguous, else a copy first).
pub fn reshape(a: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let a = a.contiguous()?;
    let layout = a.layout().reshape(shape)?;
    Ok(a.view(layout, Some(Arc::new(ReshapeBackward { a: a.edge() }))))
}

struct TransposeBackward {
    a: Tensor,
    d0: usize,
    d1: usize,
}
impl GradFn for TransposeBackward {
    fn name(&self) -> &'static str {
        "transpose"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(transpose(g, self.d0, self.d1)?.contiguous()?)])
    }
}

/// Swaps dimensions `d0` and `d1` (a strided view).
pub fn transpose(a: &Tensor, d0: usize, d1: usize) -> Result<Tensor> {
    let layout = a.layout().transpose(d0, d1)?;
    Ok(a.view(layout, Some(Arc::new(TransposeBackward { a: a.clone(), d0, d1 }))))
}

struct NarrowBackward {
    a: Tensor,
    dim: usize,
    start: usize,
}
impl GradFn for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // Scatter g into zeros of the input's shape: copy element by element through both layouts.
        let full = Layout::contiguous(self.a.shape());
        let dst = full.narrow(self.dim, self.start, g.shape()[self.dim])?;
        let src = g.contiguous_storage()?;
        let mut out = Storage::zeros(self.a.device(), g.dtype(), self.a.elem_count())?;
        scatter(&mut out, &dst, &src)?;
        Ok(vec![Some(Tensor::from_storage(out, self.a.shape())?)])
    }
}

fn scatter(out: &mut Storage, dst: &Layout, src: &Storage) -> Result<()> {
    use crate::backend::CpuStorage as C;
    match (out, src) {
        (Storage::Cpu(C::F32(o)), Storage::Cpu(C::F32(s))) => {
            let mut i = 0;
            dst.for_each_index(|j| {
                o[j] = s[i];
                i += 1;
            });
        }
        (Storage::Cpu(C::F64(o)), Storage::Cpu(C::F64(s))) => {
            let mut i = 0;
            dst.for_each_index(|j| {
                o[j] = s[i];
                i += 1;
            });
        }
        (o, _) => return Err(crate::Error::dtype("narrow", format!("gradient dtype {}", o.dtype()))),
    }
    Ok(())
}

/// Elements `start..start+len` along `dim` (a view).
pub fn narrow(a: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let layout = a.layout().narrow(dim, start, len)?;
    Ok(a.view(layout, Some(Arc::new(NarrowBackward { a: a.edge(), dim, start }))))
}

struct CopyBackward {
    a: Tensor,
}
impl GradFn for CopyBackward {
    fn name(&self) -> &'static str {
        "contiguous"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.clone())])
    }
}

/// A contiguous copy of a strided view.
pub fn copy_contiguous(a: &Tensor) -> Result<Tensor> {
    let s = a.storage().copy_strided(a.layout())?;
    Ok(output(s, a.shape(), &[a], || Arc::new(CopyBackward { a: a.edge() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};

    #[test]
    fn view_gradients_match_finite_differences() {
        let w = Tensor::from_vec(test_values(6, 9), &[3, 2], crate::Device::Cpu).unwrap();
        let err = max_gradient_error(
            |t| {
                let x = transpose(&reshape(&t[0], &[2, 3])?, 0, 1)?; // [3,2] strided
                let y = narrow(&x, 0, 1, 2)?; // rows 1..3
                let y = mul(&y.contiguous()?, &narrow(&w, 0, 0, 2)?.contiguous()?)?;
                sum(&mul(&y, &y)?)
            },
            &[(test_values(6, 4), vec![6])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-8, "max error {err}");
    }
}
