//! `#[adapter]`.
//!
//! parse: options `#[adapter(format = custom, merge = custom, after_init = f, name = "…")]` and
//! each field's role — `#[param(key, shape, init, lr_scale)]`, `#[hyper]` / `#[hyper(default = e)]`,
//! `#[state]`; check: parameters are `Tensor`s with a shape and an initialiser, shapes name only
//! hyper-parameters, `in_features`, `out_features` or integers, keys are unique; expand: the struct,
//! its `<Name>Config` of hyper-parameters, `<Name>::config(..)`, and the `Adapter` impl.

use crate::errors::Errors;
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Expr, Fields, Ident, LitStr, Type};

const BUILTIN_INITS: [&str; 5] = ["zeros", "ones", "kaiming_uniform", "normal", "weight_norm"];

struct Param {
    ident: Ident,
    key: String,
    shape: Vec<Expr>,
    init: Expr,
    lr_scale: Option<Expr>,
}

struct Hyper {
    ident: Ident,
    ty: Type,
    default: Option<Expr>,
    attrs: Vec<syn::Attribute>,
}

#[derive(Default)]
struct Options {
    custom_format: bool,
    custom_merge: bool,
    after_init: Option<syn::Path>,
    name: Option<LitStr>,
}

struct Model {
    options: Options,
    /// Fields marked `#[param]`, parsed or not (to tell "no parameters" from "broken ones").
    param_fields: usize,
    params: Vec<Param>,
    hypers: Vec<Hyper>,
    states: Vec<Ident>,
}

// ---- parse ----

fn parse_options(attr: TokenStream, errs: &mut Errors) -> Options {
    let mut o = Options::default();
    let parser = syn::meta::parser(|meta| {
        let custom = |meta: &syn::meta::ParseNestedMeta| -> syn::Result<bool> {
            let v: Ident = meta.value()?.parse()?;
            if v != "custom" {
                let what = if meta.path.is_ident("merge") {
                    "`merge = custom` is the only choice: write `merge_weight` and `unmerge_weight`; without it the merge is W + ΔW"
                } else {
                    "`format = custom` is the only choice: implement `AdapterFormat` yourself; without it the adapter uses temper's generic adapter_config.json"
                };
                return Err(syn::Error::new_spanned(&v, what));
            }
            Ok(true)
        };
        if meta.path.is_ident("format") {
            o.custom_format = custom(&meta)?;
        } else if meta.path.is_ident("merge") {
            o.custom_merge = custom(&meta)?;
        } else if meta.path.is_ident("after_init") {
            o.after_init = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("name") {
            o.name = Some(meta.value()?.parse()?);
        } else {
            return Err(meta.error("unknown adapter option; expected `format = custom`, `merge = custom`, `after_init = method` or `name = \"…\"`"));
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        errs.push(e);
    }
    o
}

fn is_tensor(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Tensor"))
}

fn parse_param(f: &syn::Field, ident: &Ident, attr: &syn::Attribute, errs: &mut Errors) -> Option<Param> {
    let (mut key, mut shape, mut init, mut lr_scale) = (None::<LitStr>, None::<syn::ExprArray>, None::<Expr>, None::<Expr>);
    let r = attr.parse_nested_meta(|meta| {
        if meta.path.is_ident("key") {
            key = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("shape") {
            shape = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("init") {
            init = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("lr_scale") {
            lr_scale = Some(meta.value()?.parse()?);
        } else {
            return Err(meta.error("unknown param attribute; expected `key`, `shape`, `init` or `lr_scale`"));
        }
        Ok(())
    });
    if let Err(e) = r {
        errs.push(e);
        return None;
    }
    if !is_tensor(&f.ty) {
        errs.at(&f.ty, format!("parameter `{ident}` must have type `Tensor`"));
    }
    let Some(shape) = shape else {
        errs.at(ident, format!("parameter `{ident}` has no shape: add `shape = [r, in_features]` (hyper-parameters, `in_features`, `out_features` or integers)"));
        return None;
    };
    let Some(init) = init else {
        errs.at(ident, format!("parameter `{ident}` has no initialiser: add `init = zeros` (or ones, kaiming_uniform, normal(std), weight_norm, or a fn(&mut InitCx) -> Result<Tensor>)"));
        return None;
    };
    let key = key.map(|k| k.value()).unwrap_or_else(|| ident.to_string());
    Some(Param { ident: ident.clone(), key, shape: shape.elems.into_iter().collect(), init, lr_scale })
}

fn parse(attr: TokenStream, input: &DeriveInput, errs: &mut Errors) -> Model {
    let options = parse_options(attr, errs);
    let mut m = Model { options, param_fields: 0, params: vec![], hypers: vec![], states: vec![] };
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => f.named.iter().collect::<Vec<_>>(),
            _ => vec![],
        },
        _ => vec![],
    };
    if !matches!(&input.data, Data::Struct(s) if matches!(s.fields, Fields::Named(_))) {
        errs.at(&input.ident, "#[adapter] needs a struct with named fields");
        return m;
    }
    for f in fields {
        let Some(ident) = f.ident.clone() else { continue };
        let roles: Vec<&syn::Attribute> = f.attrs.iter().filter(|a| ["param", "hyper", "state"].iter().any(|r| a.path().is_ident(r))).collect();
        match roles.as_slice() {
            [] => errs.at(&ident, format!("field `{ident}` is neither a parameter nor a hyper-parameter: mark it `#[param(shape = [..], init = ..)]`, `#[hyper]` or `#[state]`")),
            [a] if a.path().is_ident("param") => {
                m.param_fields += 1;
                m.params.extend(parse_param(f, &ident, a, errs))
            }
            [a] if a.path().is_ident("hyper") => {
                let mut default = None;
                if matches!(a.meta, syn::Meta::List(_)) {
                    let r = a.parse_nested_meta(|meta| {
                        if meta.path.is_ident("default") {
                            default = Some(meta.value()?.parse()?);
                            Ok(())
                        } else {
                            Err(meta.error("unknown hyper attribute; expected `default = value`"))
                        }
                    });
                    if let Err(e) = r {
                        errs.push(e);
                    }
                }
                let attrs = f.attrs.iter().filter(|a| a.path().is_ident("doc")).cloned().collect();
                m.hypers.push(Hyper { ident, ty: f.ty.clone(), default, attrs });
            }
            [_] => m.states.push(ident),
            [_, second, ..] => errs.at(second, format!("field `{ident}` has more than one role: it is a param, a hyper-parameter or state")),
        }
    }
    m
}

// ---- check ----

fn check(input: &DeriveInput, m: &Model, errs: &mut Errors) {
    if m.param_fields == 0 && matches!(&input.data, Data::Struct(_)) {
        errs.at(&input.ident, "an adapter needs at least one `#[param(..)]` tensor");
    }
    let hyper_names: Vec<String> = m.hypers.iter().map(|h| h.ident.to_string()).collect();
    let known = || {
        let mut v = hyper_names.clone();
        v.extend(["in_features".into(), "out_features".into()]);
        v.join(", ")
    };
    let mut keys: Vec<&str> = Vec::new();
    for p in &m.params {
        if keys.contains(&p.key.as_str()) {
            errs.at(&p.ident, format!("two parameters have the key `{}`; keys must be unique", p.key));
        }
        keys.push(&p.key);
        for d in &p.shape {
            match d {
                Expr::Path(e) if e.path.get_ident().is_some_and(|i| hyper_names.contains(&i.to_string()) || i == "in_features" || i == "out_features") => {}
                Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(_), .. }) => {}
                other => errs.at(other, format!("a shape dimension must be one of: {}, or an integer", known())),
            }
        }
        match &p.lr_scale {
            None | Some(Expr::Lit(syn::ExprLit { lit: syn::Lit::Float(_), .. })) => {}
            Some(Expr::Path(e)) if e.path.get_ident().is_some_and(|i| hyper_names.contains(&i.to_string())) => {}
            Some(other) => errs.at(other, format!("`lr_scale` must name a hyper-parameter ({}) or be a float literal", hyper_names.join(", "))),
        }
    }
}

// ---- expand ----

/// The call that initialises one parameter from `cx`.
fn init_call(init: &Expr) -> TokenStream {
    let builtin = |p: &syn::Path| p.get_ident().filter(|i| BUILTIN_INITS.contains(&i.to_string().as_str())).cloned();
    match init {
        Expr::Path(e) => match builtin(&e.path) {
            Some(i) => quote!(::temper::adapters::init::#i(&mut cx)),
            None => quote_spanned!(e.span()=> #e(&mut cx)),
        },
        Expr::Call(c) => {
            let args = &c.args;
            match &*c.func {
                Expr::Path(e) => match builtin(&e.path) {
                    Some(i) => quote!(::temper::adapters::init::#i(&mut cx, #args)),
                    None => quote_spanned!(e.span()=> #e(&mut cx, #args)),
                },
                f => quote_spanned!(f.span()=> (#f)(&mut cx, #args)),
            }
        }
        other => quote_spanned!(other.span()=> (#other)(&mut cx)),
    }
}

pub fn expand(attr: TokenStream, mut input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errs = Errors::new();
    let m = parse(attr, &input, &mut errs);
    check(&input, &m, &mut errs);
    errs.finish()?;

    // The struct itself, without our field attributes.
    if let Data::Struct(s) = &mut input.data {
        for f in s.fields.iter_mut() {
            f.attrs.retain(|a| !["param", "hyper", "state"].iter().any(|r| a.path().is_ident(r)));
        }
    }
    let (name, vis) = (&input.ident, &input.vis);
    let adapter_name = m.options.name.as_ref().map(|n| n.value()).unwrap_or_else(|| name.to_string());
    let cfg = format_ident!("{}Config", name);
    let (hi, ht): (Vec<&Ident>, Vec<&Type>) = m.hypers.iter().map(|h| (&h.ident, &h.ty)).unzip();

    // <Name>Config: the hyper-parameters, serialisable, with defaults for optional ones.
    let cfg_fields = m.hypers.iter().map(|h| {
        let (i, t, docs) = (&h.ident, &h.ty, &h.attrs);
        match &h.default {
            Some(_) => {
                let f = format!("{cfg}::__default_{i}");
                quote!(#(#docs)* #[serde(default = #f)] pub #i: #t)
            }
            None => quote!(#(#docs)* pub #i: #t),
        }
    });
    let default_fns = m.hypers.iter().filter_map(|h| {
        let (i, t, d) = (&h.ident, &h.ty, h.default.as_ref()?);
        let f = format_ident!("__default_{}", i);
        Some(quote!(#[doc(hidden)] pub fn #f() -> #t { #d }))
    });
    let required: Vec<&Hyper> = m.hypers.iter().filter(|h| h.default.is_none()).collect();
    let (ri, rt): (Vec<&Ident>, Vec<&Type>) = required.iter().map(|h| (&h.ident, &h.ty)).unzip();
    let ctor_fields = m.hypers.iter().map(|h| {
        let i = &h.ident;
        match &h.default {
            Some(_) => {
                let f = format_ident!("__default_{}", i);
                quote!(#i: #cfg::#f())
            }
            None => quote!(#i),
        }
    });

    // Adapter::init: bind hypers and features, build each parameter, then Self.
    let param_inits = m.params.iter().map(|p| {
        let (i, key) = (&p.ident, &p.key);
        let dims = p.shape.iter().map(|d| quote!((#d) as usize));
        let call = init_call(&p.init);
        quote! {
            let #i = {
                let shape: &[usize] = &[#(#dims),*];
                let mut cx = ::temper::adapters::InitCx { base, key: #key, shape, dtype, rng: &mut *rng };
                let t: ::temper::Tensor = #call?;
                if t.shape() != shape {
                    return ::std::result::Result::Err(::temper::Error::BadTensor {
                        name: ::std::format!("{}.{}", base.module, #key),
                        msg: ::std::format!("initialiser made shape {:?}, declared {:?}", t.shape(), shape),
                    });
                }
                t.requires_grad()
            };
        }
    });
    let pi: Vec<&Ident> = m.params.iter().map(|p| &p.ident).collect();
    let pk: Vec<&String> = m.params.iter().map(|p| &p.key).collect();
    let si = &m.states;
    let lr_arms = m.params.iter().filter_map(|p| {
        let key = &p.key;
        let s = p.lr_scale.as_ref()?;
        let v = match s {
            Expr::Path(_) => quote!(self.#s as f64),
            _ => quote!(#s as f64),
        };
        Some(quote!(#key => #v,))
    });
    let lr_fn = if m.params.iter().any(|p| p.lr_scale.is_some()) {
        quote!(fn lr_scale(&self, key: &str) -> f64 { match key { #(#lr_arms)* _ => 1.0 } })
    } else {
        quote!()
    };
    let merge_fns = if m.options.custom_merge {
        quote! {
            fn merge(&mut self, base: ::temper::adapters::BaseLayer<'_>) -> ::temper::Result<::temper::Tensor> { #name::merge_weight(self, base) }
            fn unmerge(&mut self, base: ::temper::adapters::BaseLayer<'_>) -> ::temper::Result<::temper::Tensor> { #name::unmerge_weight(self, base) }
        }
    } else {
        quote!()
    };
    let after_init = m.options.after_init.as_ref().map(|f| quote! {
        const REWRITES_BASE: bool = true;
        fn after_init(&mut self, weight: &mut ::temper::Tensor) -> ::temper::Result<()> { #name::#f(self, weight) }
    });
    let format_impl = if m.options.custom_format { quote!() } else { quote!(impl ::temper::adapters::AdapterFormat for #name {}) };
    let forward = quote_spanned! {name.span()=>
        fn forward(&self, x: &::temper::Tensor, base: ::temper::adapters::BaseLayer<'_>) -> ::temper::Result<::temper::Tensor> {
            // Write `fn delta(&self, x: &Tensor, base: BaseLayer<'_>) -> Result<Tensor>` in an `impl` of the adapter.
            #name::delta(self, x, base)
        }
    };
    let cfg_doc = format!("Hyper-parameters of [`{name}`], one field per `#[hyper]`.");
    let ctor_doc = format!("[`{name}`] on every linear layer with these hyper-parameters (optional ones at their defaults); refine with `.targets(..)`, `.with(..)`, `.pattern(..)`.");
    let _ = Span::call_site();

    Ok(quote! {
        #[derive(Clone, Debug)]
        #input

        #[doc = #cfg_doc]
        #[derive(Clone, Debug, PartialEq, ::temper::__private::serde::Serialize, ::temper::__private::serde::Deserialize)]
        #[serde(crate = "::temper::__private::serde")]
        #vis struct #cfg {
            #(#cfg_fields,)*
        }

        impl #cfg {
            #(#default_fns)*
        }

        impl #name {
            #[doc = #ctor_doc]
            #[allow(clippy::too_many_arguments)]
            #vis fn config(#(#ri: #rt),*) -> ::temper::adapters::AdapterConfig<#name> {
                ::temper::adapters::AdapterConfig::new(#cfg { #(#ctor_fields),* })
            }
        }

        impl ::temper::adapters::Adapter for #name {
            type Config = #cfg;
            const NAME: &'static str = #adapter_name;

            #[allow(unused_variables)]
            fn init(config: &#cfg, base: ::temper::adapters::BaseLayer<'_>, rng: &mut ::temper::rng::Rng) -> ::temper::Result<Self> {
                #(let #hi: #ht = ::std::clone::Clone::clone(&config.#hi);)*
                let in_features = base.in_features();
                let out_features = base.out_features();
                let dtype = if base.weight.dtype() == ::temper::DType::F64 { ::temper::DType::F64 } else { ::temper::DType::F32 };
                #(#param_inits)*
                ::std::result::Result::Ok(#name { #(#pi,)* #(#hi,)* #(#si: ::std::default::Default::default(),)* })
            }
            fn config(&self) -> #cfg {
                #cfg { #(#hi: ::std::clone::Clone::clone(&self.#hi)),* }
            }
            fn visit_params(&self, f: &mut dyn FnMut(&'static str, &::temper::Tensor)) {
                #(f(#pk, &self.#pi);)*
            }
            fn visit_params_mut(&mut self, f: &mut dyn FnMut(&'static str, &mut ::temper::Tensor) -> ::temper::Result<()>) -> ::temper::Result<()> {
                #(f(#pk, &mut self.#pi)?;)*
                ::std::result::Result::Ok(())
            }
            #lr_fn
            #forward
            #merge_fns
            #after_init
        }

        impl ::temper::adapters::Switchable for #name {}
        #format_impl
    })
}
