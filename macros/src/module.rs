//! `#[derive(Module)]`.
//!
//! parse: each field's `#[module(rename = "…", skip)]`; check: renames are non-empty and `{i}`
//! appears only on `Vec` fields; expand: the four walks of `::temper::module::Module`, each field
//! delegated to its own `Module` impl under its Hugging Face key.

use crate::errors::Errors;
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitStr, Type};

/// One field as the walk sees it.
struct Field {
    ident: syn::Ident,
    ty: Type,
    /// The key under the parent's prefix; `{i}` marks per-element keys of a `Vec`.
    key: String,
}

// ---- parse + check ----

fn is_vec(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Vec"))
}

fn parse(input: &DeriveInput, errs: &mut Errors) -> Vec<Field> {
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => &f.named,
            _ => {
                errs.at(&input.ident, "#[derive(Module)] needs a struct with named fields");
                return vec![];
            }
        },
        _ => {
            errs.at(&input.ident, "#[derive(Module)] needs a struct with named fields");
            return vec![];
        }
    };
    let mut out = Vec::new();
    for f in fields {
        let Some(ident) = f.ident.clone() else { continue };
        let (mut rename, mut skip): (Option<LitStr>, Option<syn::Path>) = (None, None);
        for attr in f.attrs.iter().filter(|a| a.path().is_ident("module")) {
            let r = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    rename = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("skip") {
                    skip = Some(meta.path.clone());
                } else {
                    let name = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
                    return Err(meta.error(format!("unknown module attribute `{name}`; expected `rename = \"…\"` or `skip`")));
                }
                Ok(())
            });
            if let Err(e) = r {
                errs.push(e);
            }
        }
        match (skip, rename) {
            (Some(_), Some(r)) => errs.at(&r, "a skipped field has no key: remove `rename` or `skip`"),
            (Some(_), None) => {}
            (None, r) => {
                let key = r.as_ref().map(|r| r.value()).unwrap_or_else(|| ident.to_string());
                if let Some(r) = &r {
                    if key.is_empty() {
                        errs.at(r, "empty rename: give the Hugging Face key of this field, e.g. \"model.embed_tokens\"");
                    } else if key.contains("{i}") && !is_vec(&f.ty) {
                        errs.at(r, "`{i}` numbers the elements of a `Vec` field; this field is not a `Vec`");
                    }
                }
                out.push(Field { ident, ty: f.ty.clone(), key });
            }
        }
    }
    out
}

// ---- expand ----

/// One delegating call per field: `Module::$method(&self.f, key, f)`, spanned on the field type so a
/// type that is not a module is reported there.
fn calls(fields: &[Field], method: &str, mutable: bool, fallible: bool) -> Vec<TokenStream> {
    let m = syn::Ident::new(method, proc_macro2::Span::call_site());
    fields
        .iter()
        .map(|fl| {
            let (ident, ty) = (&fl.ident, &fl.ty);
            let q = if fallible { quote!(?) } else { quote!() };
            let borrow = if mutable { quote!(&mut) } else { quote!(&) };
            // The field is bound first so that the call (and a "not a module" error) carries the
            // span of the field's type alone.
            let field = syn::Ident::new("__field", ty.span());
            if let Some((head, tail)) = fl.key.split_once("{i}") {
                let (head, tail) = (head.to_string(), tail.to_string());
                let iter = if mutable { quote!(iter_mut) } else { quote!(iter) };
                let call = quote_spanned! {ty.span()=> ::temper::module::Module::#m(#field, &::temper::module::join(prefix, &key), f) #q };
                quote! {
                    for (i, #field) in self.#ident.#iter().enumerate() {
                        let key = ::std::format!("{}{}{}", #head, i, #tail);
                        #call;
                    }
                }
            } else {
                let key = &fl.key;
                let call = quote_spanned! {ty.span()=> ::temper::module::Module::#m(#field, &::temper::module::join(prefix, #key), f) #q };
                quote! {
                    {
                        let #field = #borrow self.#ident;
                        #call;
                    }
                }
            }
        })
        .collect()
}

pub fn derive(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errs = Errors::new();
    let fields = parse(&input, &mut errs);
    errs.finish()?;
    let name = &input.ident;
    let (impl_g, ty_g, where_c) = input.generics.split_for_impl();
    let visit = calls(&fields, "visit", false, false);
    let visit_mut = calls(&fields, "visit_mut", true, true);
    let linears = calls(&fields, "visit_linears", false, false);
    let linears_mut = calls(&fields, "visit_linears_mut", true, true);
    Ok(quote! {
        impl #impl_g ::temper::module::Module for #name #ty_g #where_c {
            fn visit(&self, prefix: &str, f: &mut ::temper::module::Visit<'_>) {
                #(#visit)*
            }
            fn visit_mut(&mut self, prefix: &str, f: &mut ::temper::module::VisitMut<'_>) -> ::temper::Result<()> {
                #(#visit_mut)*
                ::std::result::Result::Ok(())
            }
            fn visit_linears(&self, prefix: &str, f: &mut ::temper::module::VisitLinearRef<'_>) {
                #(#linears)*
            }
            fn visit_linears_mut(&mut self, prefix: &str, f: &mut ::temper::module::VisitLinear<'_>) -> ::temper::Result<()> {
                #(#linears_mut)*
                ::std::result::Result::Ok(())
            }
        }
    })
}
