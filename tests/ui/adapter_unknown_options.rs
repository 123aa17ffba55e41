use temper::adapters::BaseLayer;
use temper::{adapter, Result, Tensor};

#[adapter(merge = linear)]
pub struct Scale {
    #[param(shape = [out_features], init = ones, scale = 2.0)]
    pub s: Tensor,
    #[hyper(defualt = 1.0)]
    pub alpha: f64,
}

impl Scale {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        temper::ops::mul_row(x, &self.s)
    }
}

fn main() {}
