//! Build script of the engine: declares the cfgs it understands. Nothing here writes into the
//! source tree.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rerun-if-changed=build.rs");
}
