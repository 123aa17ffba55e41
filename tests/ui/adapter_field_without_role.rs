use temper::adapters::BaseLayer;
use temper::{adapter, Result, Tensor};

#[adapter]
pub struct Scale {
    #[param(shape = [out_features], init = ones)]
    pub s: Tensor,
    pub note: String,
}

impl Scale {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        temper::ops::mul_row(x, &self.s)
    }
}

fn main() {}
