//! Adapters on linear layers: the [`Adapter`] trait that `#[adapter]` implements, where adapters go
//! ([`AdapterConfig`], [`Targets`]), how they are attached, merged, switched and saved
//! ([`AdapterHost`]), and the built-in LoRA family.

pub mod adapter;
pub mod config;
pub mod dora;
pub mod format;
pub mod host;
pub mod init;
pub mod lora;
pub mod peft;

pub use adapter::{delta_weight, Adapter, BaseLayer, InitCx, InitFn, Switchable};
pub use config::{AdapterConfig, Targets};
pub use dora::{Dora, DoraConfig};
pub use lora::{Lora, LoraConfig};
pub use peft::LoraInit;
pub use format::AdapterFormat;
pub use host::AdapterHost;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The adapter type of a model that carries none. It has no values, so a `Linear<NoAdapter>` can
/// never hold an adapter and the model is exactly the base model.
#[derive(Clone, Copy, Debug)]
pub enum NoAdapter {}

impl Adapter for NoAdapter {
    type Config = ();
    const NAME: &'static str = "NoAdapter";
    fn init(_: &(), base: BaseLayer<'_>, _: &mut Rng) -> Result<Self> {
        Err(Error::Input(format!("cannot attach an adapter to `{}` of a model without an adapter type; use Llama::with_adapter", base.module)))
    }
    fn config(&self) {
        match *self {}
    }
    fn visit_params(&self, _: &mut dyn FnMut(&'static str, &Tensor)) {
        match *self {}
    }
    fn visit_params_mut(&mut self, _: &mut dyn FnMut(&'static str, &mut Tensor) -> Result<()>) -> Result<()> {
        match *self {}
    }
    fn forward(&self, _: &Tensor, _: BaseLayer<'_>) -> Result<Tensor> {
        match *self {}
    }
}

impl AdapterFormat for NoAdapter {}
