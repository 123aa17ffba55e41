//! A user-defined adapter, y = W x + s · g ∘ B(A x), trained with `ce + 0.1·kl` and saved.
//! `cargo run --release --example custom_adapter`
use temper::prelude::*;

#[adapter]
pub struct GatedLora {
    #[param(key = "lora_A.weight", shape = [r, in_features], init = kaiming_uniform)]
    pub lora_a: Tensor,
    #[param(key = "lora_B.weight", shape = [out_features, r], init = zeros)]
    pub lora_b: Tensor,
    #[param(shape = [out_features], init = ones)]
    pub gate: Tensor,
    #[hyper] pub r: usize,
    #[hyper] pub alpha: f64,
}

impl GatedLora {
    fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
        let h = ops::linear(&ops::linear(x, &self.lora_a, None)?, &self.lora_b, None)?;
        ops::scale(&ops::mul_row(&h, &self.gate)?, self.alpha / self.r as f64)
    }
}

pub fn main() -> Result<()> {
    let base = Llama::load("tests/fixtures/models/llama_gqa_llama3rope".as_ref(), DType::F32)?;
    let model = base.with_adapter("default", &GatedLora::config(4, 8.0).targets(Targets::names(["q_proj", "v_proj"])))?;
    model.print_trainable_parameters();
    let ids = Tensor::from_vec((0..16).map(|i| i * 7 % 100).collect::<Vec<i64>>(), &[2, 8], Device::Cpu)?;
    let batch = Batch { input: ForwardInput::ids(ids.clone()), labels: ids };
    let mut trainer = Trainer::new(model, ce() + 0.1 * kl(), AdamW::lr(1e-2));
    for _ in 0..20 {
        let log = trainer.step(&batch)?;
        println!("step {:>2}  loss {:.4}  {:?}", log.step, log.loss, log.terms);
    }
    trainer.save_adapter("default", "target/gated-lora".as_ref())
}
