//! `.ci/find-libclang`, the setup's probe for the libclang that bindgen loads, run against
//! made-up trees (`--root`): libclang-cpp alone is not libclang (the defect that let a fresh
//! machine's build fail after `.ci/setup` said all was well).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The first bytes of a 64-bit ELF file, which is all the probe (like clang-sys) reads.
const ELF64: &[u8] = b"\x7fELF\x02\x01\x01\0";

struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Tree {
        let dir = std::env::temp_dir().join(format!("ferry-find-libclang-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Tree(dir)
    }

    fn file(&self, path: &str, contents: &[u8]) -> &Tree {
        let path = self.0.join(path.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
        self
    }

    fn probe(&self, libclang_path: Option<&str>) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/find-libclang");
        let mut command = Command::new(script);
        command.arg("--root").arg(&self.0).env_remove("LD_LIBRARY_PATH").env_remove("LIBRARY_PATH");
        match libclang_path {
            Some(p) => command.env("LIBCLANG_PATH", p),
            None => command.env_remove("LIBCLANG_PATH"),
        };
        command.output().expect("the probe runs")
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn found(out: &Output) -> String {
    assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn missing(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "probe found {:?}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn libclang_cpp_alone_is_reported_missing_with_the_package_to_install() {
    let tree = Tree::new("cpp-only");
    tree.file("/usr/lib/llvm-14/lib/libclang-cpp.so.14", ELF64)
        .file("/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", ELF64);
    let err = missing(&tree.probe(None));
    assert!(err.contains("libclang-dev"), "{err}");
}

#[test]
fn a_versioned_libclang_is_found_where_bindgen_looks() {
    let tree = Tree::new("versioned");
    tree.file("/usr/lib/llvm-14/lib/libclang-cpp.so.14", ELF64)
        .file("/usr/lib/x86_64-linux-gnu/libclang-14.so.1", ELF64);
    let path = found(&tree.probe(None));
    assert!(path.ends_with("/usr/lib/x86_64-linux-gnu/libclang-14.so.1"), "{path}");
    let tree = Tree::new("unversioned");
    tree.file("/usr/lib/llvm-16/lib/libclang.so", ELF64);
    assert!(found(&tree.probe(None)).ends_with("/usr/lib/llvm-16/lib/libclang.so"));
}

#[test]
fn a_file_that_is_not_a_64_bit_elf_library_does_not_count() {
    let tree = Tree::new("not-elf");
    tree.file("/usr/lib/llvm-14/lib/libclang.so", b"INPUT(libclang-14.so.1)\n")
        .file("/usr/lib/i386-linux-gnu/libclang-14.so.1", b"\x7fELF\x01\x01\x01\0");
    missing(&tree.probe(None));
}

#[test]
fn libclang_path_is_the_only_place_searched_when_it_is_set() {
    let tree = Tree::new("libclang-path");
    tree.file("/usr/lib/llvm-14/lib/libclang.so", ELF64).file("/opt/clang/lib/libclang-17.so", ELF64);
    assert!(found(&tree.probe(Some("/opt/clang/lib"))).ends_with("/opt/clang/lib/libclang-17.so"));
    assert!(found(&tree.probe(Some("/opt/clang/lib/libclang-17.so"))).ends_with("/opt/clang/lib/libclang-17.so"));
    let err = missing(&tree.probe(Some("/opt/elsewhere")));
    assert!(err.contains("LIBCLANG_PATH"), "{err}");
}
