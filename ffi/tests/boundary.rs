//! Every C export goes through the panic boundary. The check reads src/lib.rs: the body of each
//! `#[no_mangle] extern "C"` function must be one call of the boundary helper for what it
//! returns (`guard` for a `ferry_result`, `guard_free` for nothing, `guard_value` for a plain
//! value), naming the export and taking the whole work as a closure; and the exports it finds
//! must be exactly the functions of include/ferry.h, so none escapes the check.

use std::collections::BTreeSet;
use syn::{Expr, Item, ReturnType, Stmt, Type};

const SOURCE: &str = include_str!("../src/lib.rs");
const HEADER: &str = include_str!("../include/ferry.h");

/// The exports of `source` (by name) and what is wrong with each one that skips the boundary.
fn check(source: &str) -> (BTreeSet<String>, Vec<String>) {
    let file = syn::parse_file(source).expect("src/lib.rs parses");
    let mut names = BTreeSet::new();
    let mut problems = Vec::new();
    let mut functions = Vec::new();
    collect(&file.items, &mut functions, &mut problems);
    for f in functions {
        let name = f.sig.ident.to_string();
        if let Err(problem) = check_export(&f) {
            problems.push(format!("{name}: {problem}"));
        }
        names.insert(name);
    }
    // An export written by a macro is invisible to the parse above: count the attribute itself.
    let attributes = source.matches("#[no_mangle]").count() + source.matches("#[unsafe(no_mangle)]").count();
    if attributes != names.len() {
        problems.push(format!("{attributes} `no_mangle` attributes but {} exports found by parsing", names.len()));
    }
    let catches = source.matches("catch_unwind(").count();
    if catches != 1 {
        problems.push(format!("catch_unwind( appears {catches} times: the one boundary is catch_panic"));
    }
    (names, problems)
}

/// Every function that is exported or has a foreign ABI, in modules too; exports in impl blocks
/// are refused (this check does not follow them).
fn collect(items: &[Item], out: &mut Vec<syn::ItemFn>, problems: &mut Vec<String>) {
    for item in items {
        match item {
            Item::Fn(f) if f.sig.abi.is_some() || is_exported(&f.attrs) => out.push(f.clone()),
            Item::Mod(m) => collect(m.content.as_ref().map_or(&[][..], |(_, items)| items), out, problems),
            Item::Impl(i) => {
                for item in &i.items {
                    if let syn::ImplItem::Fn(f) = item {
                        if f.sig.abi.is_some() || is_exported(&f.attrs) {
                            problems.push(format!("{}: an export inside an impl block", f.sig.ident));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// `#[no_mangle]`, `#[export_name = ...]`, or either inside `#[unsafe(...)]`.
fn is_exported(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        path.is_ident("no_mangle")
            || path.is_ident("export_name")
            || (path.is_ident("unsafe")
                && a.meta.require_list().is_ok_and(|list| {
                    let tokens = list.tokens.to_string();
                    tokens.contains("no_mangle") || tokens.contains("export_name")
                }))
    })
}

fn doc(attrs: &[syn::Attribute]) -> String {
    let mut text = String::new();
    for a in attrs {
        if let syn::Meta::NameValue(nv) = &a.meta {
            if nv.path.is_ident("doc") {
                if let Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) = &nv.value {
                    text += &s.value();
                    text += "\n";
                }
            }
        }
    }
    text
}

fn check_export(f: &syn::ItemFn) -> Result<(), String> {
    let name = f.sig.ident.to_string();
    let abi = f.sig.abi.as_ref().and_then(|abi| abi.name.as_ref()).map(|n| n.value());
    if abi.as_deref() != Some("C") {
        return Err(format!("the ABI is {abi:?}, not \"C\""));
    }
    if !matches!(f.vis, syn::Visibility::Public(_)) {
        return Err("not pub".into());
    }
    if !is_exported(&f.attrs) {
        return Err("extern \"C\" without #[no_mangle]".into());
    }
    let helper = match &f.sig.output {
        ReturnType::Default => "guard_free",
        ReturnType::Type(_, ty) if matches!(&**ty, Type::Path(p) if p.path.is_ident("ferry_result")) => "guard",
        ReturnType::Type(..) => "guard_value",
    };
    let [Stmt::Expr(Expr::Call(call), None)] = &f.block.stmts[..] else {
        return Err(format!("the body is not one call of {helper}(\"{name}\", ...)"));
    };
    let called = match &*call.func {
        Expr::Path(p) => p.path.get_ident().map(|i| i.to_string()),
        _ => None,
    };
    if called.as_deref() != Some(helper) {
        return Err(format!("the body calls {called:?}, not {helper}"));
    }
    match call.args.first() {
        Some(Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. })) if s.value() == name => {}
        _ => return Err(format!("{helper}'s first argument is not \"{name}\"")),
    }
    if !matches!(call.args.last(), Some(Expr::Closure(_))) {
        return Err(format!("{helper}'s last argument is not a closure holding the work"));
    }
    if helper == "guard_value" && !doc(&f.attrs).contains("panicked") {
        return Err("the doc comment does not say what it returns if ferry panicked".into());
    }
    Ok(())
}

/// The function names of the header's prototypes.
fn header_functions(header: &str) -> BTreeSet<String> {
    header
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("//") && !line.starts_with('#'))
        .filter_map(|line| line.split_once('(').map(|(before, _)| before))
        .filter_map(|before| before.rsplit([' ', '*']).next())
        .filter(|name| name.starts_with("ferry_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_export_goes_through_the_panic_boundary() {
    let (names, problems) = check(SOURCE);
    assert!(problems.is_empty(), "exports that skip the panic boundary:\n{}", problems.join("\n"));
    assert_eq!(names, header_functions(HEADER), "the exports of src/lib.rs and the functions of include/ferry.h");
    assert!(names.len() >= 20, "only {} exports found: {names:?}", names.len());
}

#[test]
fn the_check_finds_an_export_that_skips_the_boundary() {
    let cases = [
        ("#[no_mangle] pub unsafe extern \"C\" fn ferry_x(p: *const u8) -> u32 { p as u32 }", "not one call"),
        (
            "#[no_mangle] pub unsafe extern \"C\" fn ferry_x() -> ferry_result { guard(\"ferry_y\", || Ok(())) }",
            "first argument",
        ),
        (
            "#[no_mangle] pub unsafe extern \"C\" fn ferry_x() -> ferry_result { guard_value(\"ferry_x\", 0, || 1) }",
            "not guard",
        ),
        ("#[no_mangle] pub unsafe extern \"C\" fn ferry_x(p: *mut u8) { drop(p); }", "not one call"),
        ("#[no_mangle] pub unsafe extern \"C\" fn ferry_x(p: *mut u8) { drop(p) }", "not guard_free"),
        (
            "/// x\n#[no_mangle] pub unsafe extern \"C\" fn ferry_x() -> u32 { guard_value(\"ferry_x\", 0, || 1) }",
            "panicked",
        ),
        ("#[no_mangle] pub unsafe extern \"C-unwind\" fn ferry_x() { guard_free(\"ferry_x\", || ()) }", "ABI"),
        ("#[no_mangle] pub unsafe extern \"C\" fn ferry_x() -> ferry_result { guard(\"ferry_x\", make()) }", "closure"),
        ("mod m { #[no_mangle] pub extern \"C\" fn ferry_x() -> u64 { 7 } }", "not one call"),
        ("macro_rules! e { () => { #[no_mangle] pub extern \"C\" fn ferry_x() {} } }", "attributes"),
    ];
    for (source, expected) in cases {
        let source = format!("fn catch_panic() {{ catch_unwind(f) }}\n{source}");
        let (_, problems) = check(&source);
        assert!(problems.iter().any(|p| p.contains(expected)), "{source}\nwanted {expected:?}, got {problems:?}");
    }
}
