//! The `ferry` command: topo on fixture machines, doctor here, argument errors.

use std::path::Path;
use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().expect("ferry runs")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/fixtures").join(name).to_string_lossy().into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn topo_prints_the_matrix_and_the_plan_of_a_dgx() {
    let out = ferry(&["topo", "--sysfs", &fixture("dgx-h100")]);
    assert!(out.status.success());
    let text = stdout(&out);
    let header = text.lines().nth(1).unwrap();
    assert!(header.find("mlx5_2").unwrap() < header.find("mlx5_10").unwrap(), "natural NIC order: {header}");
    let gpu0 = text.lines().find(|l| l.starts_with("GPU0 ")).unwrap();
    assert!(gpu0.contains("PIX") && gpu0.contains("SYS") && gpu0.ends_with("0000:18:00.0"), "{gpu0}");
    assert!(
        text.contains("GPU5 0000:ab:00.0 (NUMA 1): NIC mlx5_9 (PIX, nearest RDMA NIC); worker cores 222"),
        "{text}"
    );
    assert!(text.contains("NIC mlx5_1: 0000:6b:00.0, port 1 ACTIVE Ethernet"), "{text}");
}

#[test]
fn topo_of_the_gpu_vm_says_there_is_no_rdma_nic() {
    let text = stdout(&ferry(&["topo", "--sysfs", &fixture("h100-vm"), "--workers-per-gpu", "2"]));
    assert!(text.contains("no RDMA NIC"), "{text}");
    assert!(text.contains("GPU0 0000:00:06.0 (NUMA unknown): no NIC; worker cores 14-15"), "{text}");
}

#[test]
fn topo_on_a_missing_tree_fails_naming_the_file() {
    let out = ferry(&["topo", "--sysfs", "/nonexistent-sysfs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("devices/system/cpu/online"));
}

#[test]
fn doctor_runs_here_and_ends_with_a_decision_and_a_count() {
    let out = ferry(&["doctor"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("Transport per GPU:"), "{text}");
    let last = text.lines().last().unwrap();
    assert!(last.ends_with("FAIL") && last.contains("OK,"), "{last}");
    for line in text.lines().filter(|l| l.starts_with("WARN") || l.starts_with("FAIL")) {
        let next = text.lines().skip_while(|l| *l != line).nth(1).unwrap_or("");
        assert!(next.trim_start().starts_with("fix:"), "no fix after {line:?}");
    }
}

#[test]
fn doctor_on_a_fixture_checks_its_nics() {
    let text = stdout(&ferry(&["doctor", "--sysfs", &fixture("dgx-h100")]));
    assert!(text.contains("OK    mlx5_0 port 1: ACTIVE (InfiniBand)"), "{text}");
    assert!(text.contains("mlx5_1 port 1: 1 usable GIDs (1 RoCE v2)"), "{text}");
    assert!(text.contains("GPU0 0000:18:00.0:"), "{text}");
}

#[test]
fn bad_arguments_exit_2_with_usage() {
    let out = ferry(&["bench", "--transport", "warp"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--transport \"warp\"") && err.contains("usage: ferry bench"), "{err}");
    assert_eq!(ferry(&["frobnicate"]).status.code(), Some(2));
    assert!(ferry(&["help"]).status.success());
}

#[test]
fn bench_refuses_a_zero_writer_gate_or_crossover() {
    const WRITERS: &str = "--writers: one number of warps, or two (below 16 KiB, from it up), each at least 1";
    for (args, says) in [
        (&["bench", "--writers", "0"][..], WRITERS),
        (&["bench", "--writers", "16,0"][..], WRITERS),
        (&["bench", "--writers", "16,x"][..], WRITERS),
        (&["bench", "--writers", "8,12,16"][..], WRITERS),
        (&["bench", "--crossover", "0"][..], "--crossover: one block size, or two (H2D,D2H)"),
        (&["bench", "--crossover", "64K,0"][..], "--crossover: one block size, or two (H2D,D2H)"),
        (&["bench", "--crossover", "1M,64K,4K"][..], "--crossover: one block size, or two (H2D,D2H)"),
    ] {
        let out = ferry(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn version_lists_the_compiled_features() {
    let out = ferry(&["--version"]);
    assert!(out.status.success());
    let line = stdout(&out);
    let expected = if cfg!(feature = "gdr") { "(features: gdr)" } else { "(features: none)" };
    assert!(line.starts_with("ferry ") && line.trim_end().ends_with(expected), "{line}");
}

#[test]
fn bench_all_gpus_needs_the_cuda_transport_and_says_why() {
    let out = ferry(&["bench", "--all-gpus", "--transport", "host"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--all-gpus works only with the cuda transport"), "{stderr}");
    if ferry::internals::cuda::gpus().is_err() {
        // No GPU here: the default transport is host, and the reason is given.
        let out = ferry(&["bench", "--all-gpus"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no GPU transport can run here"), "{stderr}");
    } else {
        println!("SKIP: a GPU is here: gpu/run.sh runs `ferry bench --all-gpus` instead");
    }
}

#[test]
fn the_null_bench_runs_beside_idle_queues_and_says_so() {
    let out = ferry(&["bench", "--transport", "null", "--descriptors", "20K", "--reps", "1", "--idle-queues", "3"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("20000 descriptors per run, 4 KiB each, 3 idle queues beside the measured one"), "{text}");
    assert!(text.contains("engine: ring -> worker -> null -> completion"), "{text}");
}
