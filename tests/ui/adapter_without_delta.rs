use temper::{adapter, Tensor};

#[adapter]
pub struct Forgotten {
    #[param(shape = [out_features], init = ones)]
    pub s: Tensor,
}

fn main() {}
