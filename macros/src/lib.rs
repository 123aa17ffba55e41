//! temper's procedural macros: modules and adapters declared in Rust syntax.
//!
//! Each macro is parse → check → expand: parsing turns attributes into a typed model, checking
//! collects every error with the user's span (all of them, not just the first), expansion only
//! writes calls into `::temper::…` — the runtime, re-exported by the facade at the same paths.

use proc_macro::TokenStream;

mod adapter;
mod errors;
mod module;

/// `#[derive(Module)]`: the named parameter walk of a struct. See the runtime's `Module` docs.
#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    module::derive(input).unwrap_or_else(|e| e.to_compile_error()).into()
}

/// `#[adapter]`: declares an adapter on linear layers. See the runtime's `adapter` docs.
#[proc_macro_attribute]
pub fn adapter(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(item as syn::DeriveInput);
    adapter::expand(attr.into(), item).unwrap_or_else(|e| e.to_compile_error()).into()
}
