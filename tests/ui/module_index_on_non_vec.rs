use temper::{Module, Tensor};

#[derive(Module)]
struct Block {
    #[module(rename = "experts.{i}.weight")]
    experts: Tensor,
    #[module(skip, rename = "eps")]
    eps: f64,
}

fn main() {}
