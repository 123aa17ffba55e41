use temper::adapters::BaseLayer;
use temper::{adapter, Result, Tensor};

#[adapter]
pub struct TwoMistakes {
    #[param(shape = [r, in_features])]
    pub lora_a: Tensor,
    #[param(init = zeros)]
    pub lora_b: Tensor,
    #[hyper]
    pub r: usize,
}

impl TwoMistakes {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        Ok(x.clone())
    }
}

fn main() {}
