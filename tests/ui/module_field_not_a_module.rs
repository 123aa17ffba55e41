use temper::{Module, Tensor};

#[derive(Module)]
struct Norm {
    weight: Tensor,
    eps: f64,
}

fn main() {}
