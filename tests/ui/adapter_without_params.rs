use temper::adapters::BaseLayer;
use temper::{adapter, Result, Tensor};

#[adapter]
pub struct Empty {
    #[hyper]
    pub alpha: f64,
}

impl Empty {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        Ok(x.clone())
    }
}

fn main() {}
