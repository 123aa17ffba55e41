use temper::{Module, Tensor};

#[derive(Module)]
enum Either {
    A(Tensor),
    B(Tensor),
}

fn main() {}
