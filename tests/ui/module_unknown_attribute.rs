use temper::{Module, Tensor};

#[derive(Module)]
struct Norm {
    #[module(renmae = "weight")]
    w: Tensor,
}

fn main() {}
