//! temper's procedural macros (placeholders until the DSL lands).
use proc_macro::TokenStream;

#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(_input: TokenStream) -> TokenStream {
    TokenStream::new()
}

#[proc_macro_attribute]
pub fn adapter(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
