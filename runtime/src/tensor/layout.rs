//! Shape, strides and offset: how a tensor views its storage. Views (reshape of a contiguous tensor,
//! transpose, narrow) only change the layout; the storage is shared.

use crate::error::{ensure_shape, Result};

/// Row-major strided view into a flat storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// A contiguous row-major layout for `shape` starting at element 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }
    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element strides per dimension.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Index of the first element in the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when elements are laid out densely in row-major order (from `offset`).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }
    /// The same elements seen with another shape; only for contiguous layouts.
    pub fn reshape(&self, shape: &[usize]) -> Result<Layout> {
        ensure_shape!(
            shape.iter().product::<usize>() == self.elem_count(),
            "reshape",
            "cannot view {:?} ({} elements) as {:?}",
            self.shape,
            self.elem_count(),
            shape
        );
        ensure_shape!(self.is_contiguous(), "reshape", "layout {:?} is not contiguous", self.shape);
        Ok(Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: self.offset })
    }
    /// Swaps two dimensions.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Layout> {
        let n = self.shape.len();
        ensure_shape!(a < n && b < n, "transpose", "dims {a},{b} out of range for rank {n}");
        let mut l = self.clone();
        l.shape.swap(a, b);
        l.strides.swap(a, b);
        Ok(l)
    }
    /// Elements `start..start+len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        let n = self.shape.len();
        ensure_shape!(dim < n, "narrow", "dim {dim} out of range for rank {n}");
        ensure_shape!(
            start + len <= self.shape[dim],
            "narrow",
            "range {start}..{} out of bounds for dim {dim} of size {}",
            start + len,
            self.shape[dim]
        );
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }
    /// Storage indices of all elements in row-major order.
    pub fn for_each_index(&self, mut f: impl FnMut(usize)) {
        if self.is_contiguous() {
            (self.offset..self.offset + self.elem_count()).for_each(f);
            return;
        }
        let n = self.shape.len();
        if self.elem_count() == 0 {
            return;
        }
        let mut idx = vec![0usize; n];
        let mut pos = self.offset;
        loop {
            f(pos);
            let mut d = n;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                pos += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                pos -= self.strides[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }
}

/// Row-major strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_then_iterate_visits_column_major() {
        let l = Layout::contiguous(&[2, 3]).transpose(0, 1).unwrap();
        let mut v = vec![];
        l.for_each_index(|i| v.push(i));
        assert_eq!(v, vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn narrow_offsets_and_reshape_checks() {
        let l = Layout::contiguous(&[4, 3]).narrow(0, 1, 2).unwrap();
        assert_eq!(l.offset(), 3);
        assert!(l.is_contiguous());
        assert!(l.reshape(&[6]).is_ok());
        let c = Layout::contiguous(&[4, 3]).narrow(1, 1, 2).unwrap();
        assert!(!c.is_contiguous());
        assert!(c.reshape(&[8]).is_err());
        assert!(Layout::contiguous(&[4, 3]).narrow(0, 3, 2).is_err());
    }
}
