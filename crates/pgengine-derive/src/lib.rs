//! `#[derive(FromRow)]` for [pgengine](https://docs.rs/pgengine): a struct made from a
//! row, each field from the column of its name. Use it through `pgengine::FromRow`.
//!
//! Field attributes: `#[pgengine(rename = "column")]` reads another column;
//! `#[pgengine(flatten)]` makes the field from the same row with its own `FromRow`.
//! A tuple struct reads its columns in order.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input};

/// Implements `pgengine::FromRow` for a struct: each field is read with
/// `pgengine::column` from the column of its name (or its position, in a tuple struct),
/// so a missing column or one of another type is an error that names it.
#[proc_macro_derive(FromRow, attributes(pgengine))]
pub fn derive_from_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match from_row(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// How one field is read.
enum Source {
    Column(Tokens),
    Flatten,
}

fn from_row(input: &DeriveInput) -> syn::Result<Tokens> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "FromRow is derived for structs only",
        ));
    };
    let body = match &data.fields {
        Fields::Named(fields) => {
            let mut values = Vec::new();
            for field in &fields.named {
                let name = field.ident.as_ref().expect("a named field");
                let default = LitStr::new(name.to_string().trim_start_matches("r#"), name.span());
                let value = read(source(field, quote!(#default))?);
                values.push(quote!(#name: #value));
            }
            quote!(Self { #(#values),* })
        }
        Fields::Unnamed(fields) => {
            let mut values = Vec::new();
            for (index, field) in fields.unnamed.iter().enumerate() {
                values.push(read(source(field, quote!(#index))?));
            }
            quote!(Self(#(#values),*))
        }
        Fields::Unit => quote!(Self),
    };
    let name = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::pgengine::FromRow for #name #type_generics #where_clause {
            fn from_row(row: &::pgengine::Row) -> ::pgengine::Result<Self> {
                ::core::result::Result::Ok(#body)
            }
        }
    })
}

/// The expression that reads a field.
fn read(source: Source) -> Tokens {
    match source {
        Source::Column(column) => quote!(::pgengine::column(row, #column)?),
        Source::Flatten => quote!(::pgengine::FromRow::from_row(row)?),
    }
}

/// Where a field comes from: its `#[pgengine(…)]` attribute, else `default`.
fn source(field: &syn::Field, default: Tokens) -> syn::Result<Source> {
    let mut source = Source::Column(default);
    for attribute in field.attrs.iter().filter(|a| a.path().is_ident("pgengine")) {
        attribute.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                let column: LitStr = meta.value()?.parse()?;
                source = Source::Column(quote!(#column));
                Ok(())
            } else if meta.path.is_ident("flatten") {
                source = Source::Flatten;
                Ok(())
            } else {
                Err(meta.error("expected `rename = \"column\"` or `flatten`"))
            }
        })?;
    }
    Ok(source)
}
