//! Compiles tests/smoke.c against include/ferry.h and libferry.so, and runs it.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_c_program_copies_through_the_engine() {
    if Command::new("cc").arg("--version").output().is_err() {
        println!("SKIP: no C compiler (cc) on PATH");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // This test runs from target/debug/deps. Test runners build only the rlib-free crate's test
    // targets, so build libferry.so here (a no-op when it is current), into target/debug.
    let libdir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--profile", "test", "-p", "ferry-ffi", "--lib"])
        .env("CARGO_TARGET_DIR", libdir.parent().unwrap())
        .status()
        .unwrap();
    assert!(built.success(), "building libferry.so failed");
    assert!(libdir.join("libferry.so").exists(), "libferry.so not found in {}", libdir.display());
    let exe = std::env::temp_dir().join(format!("ferry-c-smoke-{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join("tests/smoke.c"))
        .arg("-L")
        .arg(&libdir)
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .args(["-lferry", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "compiling smoke.c failed");
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "smoke.c failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("c smoke: ok"), "{stdout}");
}
