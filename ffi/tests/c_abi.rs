//! Compiles the C programs in tests/ against include/ferry.h and libferry.so, and runs them.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Builds libferry.so (into target/debug, beside this test) and compiles `tests/{name}.c`
/// against it into target/debug/ferry-c-{name}, which finds the library beside itself
/// (`$ORIGIN`), so that it also runs where the repository is mounted elsewhere (the Soft-RoCE
/// guest runs ferry-c-gdr). `None` (after printing SKIP) without a C compiler.
fn compile(name: &str) -> Option<PathBuf> {
    if Command::new("cc").arg("--version").output().is_err() {
        println!("SKIP: no C compiler (cc) on PATH");
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // This test runs from target/debug/deps. Test runners build only the test targets of this
    // rlib-free crate, so build libferry.so here (a no-op when it is current), into target/debug.
    let libdir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--profile", "test", "-p", "ferry-ffi", "--lib"])
        .env("CARGO_TARGET_DIR", libdir.parent().unwrap())
        .status()
        .unwrap();
    assert!(built.success(), "building libferry.so failed");
    assert!(libdir.join("libferry.so").exists(), "libferry.so not found in {}", libdir.display());
    let exe = libdir.join(format!("ferry-c-{name}"));
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join(format!("tests/{name}.c")))
        .arg("-L")
        .arg(&libdir)
        .arg("-Wl,-rpath,$ORIGIN")
        .args(["-lferry", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "compiling {name}.c failed");
    Some(exe)
}

fn check(name: &str, out: Output, marker: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(out.status.success(), "{name}.c failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(marker), "{stdout}");
}

#[test]
fn a_c_program_copies_through_the_engine() {
    let Some(exe) = compile("smoke") else { return };
    check("smoke", Command::new(&exe).output().unwrap(), "c smoke: ok");
}

#[test]
fn a_c_program_opens_and_frees_queues_without_piling_up_descriptors() {
    let Some(exe) = compile("churn") else { return };
    check("churn", Command::new(&exe).output().unwrap(), "c churn: ok");
}

#[test]
fn a_c_program_starts_the_gpu_transport_over_gdr() {
    let Some(exe) = compile("gdr") else { return };
    check("gdr", Command::new(&exe).output().unwrap(), "c gdr: ok");
}

#[test]
fn a_c_program_is_a_client_of_the_daemon() {
    let Some(exe) = compile("connect") else { return };
    // The daemon: the `ferry` binary of this workspace, built beside libferry.so.
    let libdir = exe.parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--profile", "test", "-p", "ferry", "--bin", "ferry"])
        .env("CARGO_TARGET_DIR", libdir.parent().unwrap())
        .status()
        .unwrap();
    assert!(built.success(), "building the ferry binary failed");
    let socket = std::env::temp_dir().join(format!("ferry-c-connect-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut daemon = Command::new(libdir.join("ferry"))
        .args(["serve", "--socket", socket.to_str().unwrap(), "--transport", "host", "--unpinned", "--quiet"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = Command::new(&exe).arg(&socket).output().unwrap();
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let stopped = daemon.wait().unwrap();
    check("connect", out, "c connect: ok");
    assert!(stopped.success(), "the daemon exited with {stopped}");
}
