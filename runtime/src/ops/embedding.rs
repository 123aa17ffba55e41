//! Token embedding: gather rows of the table by id.
//!
//! y[t] = W[id[t]];  dW[v] = Σ_{t: id[t] = v} dy[t]  (ids receive no gradient)

use super::output;
use crate::autograd::GradFn;
use crate::backend::{BackendStorage, Storage};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

struct EmbeddingBackward {
    table: Tensor,
    ids: Tensor,
}

impl GradFn for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.table.clone()]
    }
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (vocab, dim) = (self.table.shape()[0], self.table.shape()[1]);
        let d = Storage::embedding_backward(&*g.contiguous_storage()?, &*self.ids.contiguous_storage()?, vocab, dim)?;
        Ok(vec![Some(Tensor::from_storage(d, self.table.shape())?)])
    }
}

/// Rows of `table` (`[vocab, dim]`) for each id in `ids` (U32, any shape) → `[..ids.shape, dim]`.
/// Ids ≥ vocab are an error naming the first offending position.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    super::expect_rank("embedding", "table", table, 2)?;
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    let ids = if ids.dtype() == DType::U32 { ids.clone() } else { ids.to_dtype(DType::U32)? };
    let host = ids.to_vec::<u32>()?;
    if let Some((pos, id)) = host.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::Input(format!("token id {id} at position {pos} is out of range for vocabulary size {vocab}")));
    }
    let y = table.contiguous_storage()?.embedding(&*ids.contiguous_storage()?, dim)?;
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    Ok(output(y, &shape, &[table], || Arc::new(EmbeddingBackward { table: table.clone(), ids: ids.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::ops::{mul, sum};
    use crate::Device;

    #[test]
    fn embedding_gradient_matches_finite_differences_with_repeated_ids() {
        let ids = Tensor::from_vec(vec![1u32, 3, 1, 0], &[2, 2], Device::Cpu).unwrap();
        let w = Tensor::from_vec(test_values(2 * 2 * 3, 8), &[2, 2, 3], Device::Cpu).unwrap();
        let err = max_gradient_error(|t| sum(&mul(&embedding(&t[0], &ids)?, &w)?), &[(test_values(12, 1), vec![4, 3])], 1e-6).unwrap();
        assert!(err < 1e-9, "max error {err}");
    }

    #[test]
    fn out_of_range_id_names_position_and_vocab() {
        let t = Tensor::from_vec(vec![0f32; 8], &[4, 2], Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![1i64, 9], &[2], Device::Cpu).unwrap();
        let e = embedding(&t, &ids).unwrap_err().to_string();
        assert!(e.contains("9") && e.contains("position 1") && e.contains("4"), "{e}");
    }
}
