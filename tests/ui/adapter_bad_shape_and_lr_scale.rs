use temper::adapters::BaseLayer;
use temper::{adapter, Result, Tensor};

#[adapter]
pub struct Lowrank {
    #[param(key = "lora_A.weight", shape = [rank, in_features], init = kaiming_uniform)]
    pub lora_a: Tensor,
    #[param(key = "lora_A.weight", shape = [out_features, r], init = zeros, lr_scale = ratio)]
    pub lora_b: Tensor,
    #[hyper]
    pub r: usize,
}

impl Lowrank {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        Ok(x.clone())
    }
}

fn main() {}
