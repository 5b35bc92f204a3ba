//! The reader and the plan on sysfs trees of whole machines (see fixtures/build.py).

use ferry_topology::plan::{host_cores, plan};
use ferry_topology::{Machine, PlanConfig, Relation};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A writable copy of a fixture (symlinks kept), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn of(name: &str, tag: &str) -> Scratch {
        let dst = std::env::temp_dir().join(format!("ferry-topo-{name}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        let ok = std::process::Command::new("cp").arg("-a").arg(fixture(name)).arg(&dst).status().unwrap().success();
        assert!(ok, "copying the fixture failed");
        Scratch(dst)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DGX_NICS: [&str; 8] = ["mlx5_0", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11"];

#[test]
fn dgx_h100_each_gpu_gets_the_nic_under_its_switch_and_cores_on_its_socket() {
    let machine = Machine::read(&fixture("dgx-h100")).unwrap();
    assert!(machine.warnings.is_empty(), "{:?}", machine.warnings);
    assert_eq!(machine.gpus.len(), 8);
    assert_eq!(machine.nics.len(), 12);
    assert_eq!(machine.online.len(), 224);
    let plan = plan(&machine, &PlanConfig::default()).unwrap();
    let nics: Vec<&str> = plan.gpus.iter().map(|g| g.nic.as_ref().unwrap().name.as_str()).collect();
    assert_eq!(nics, DGX_NICS);
    assert!(plan.gpus.iter().all(|g| g.nic.as_ref().unwrap().relation == Some(Relation::Pix)));
    let cores: Vec<Vec<usize>> = plan.gpus.iter().map(|g| g.cores.clone()).collect();
    assert_eq!(cores, vec![vec![167], vec![166], vec![165], vec![164], vec![223], vec![222], vec![221], vec![220]]);
    assert!(plan.gpus.iter().all(|g| g.notes.is_empty()), "{:?}", plan.gpus);
}

#[test]
fn dgx_h100_relations_match_nvidia_smi_classes() {
    let machine = Machine::read(&fixture("dgx-h100")).unwrap();
    let nic = |name: &str| machine.nics.iter().position(|n| n.rdma.name == name).unwrap();
    assert_eq!(machine.relation(0, nic("mlx5_0")), Some(Relation::Pix));
    assert_eq!(machine.relation(0, nic("mlx5_3")), Some(Relation::Node));
    assert_eq!(machine.relation(0, nic("mlx5_1")), Some(Relation::Node));
    assert_eq!(machine.relation(0, nic("mlx5_6")), Some(Relation::Sys));
    assert_eq!(machine.relation(7, nic("mlx5_8")), Some(Relation::Node));
    let port = &machine.nics[nic("mlx5_1")].rdma.ports[0];
    assert!(port.is_active());
    assert_eq!(port.gids.len(), 1, "the all-zero GID is not usable");
    assert_eq!(port.gids[0].2, "RoCE v2");
}

#[test]
fn ties_go_to_the_nic_with_the_fewest_gpus() {
    let scratch = Scratch::of("dgx-h100", "tie");
    // GPU1 loses its own NIC: every remaining socket-0 NIC is NODE to it. mlx5_0 already serves
    // GPU0, so the first NIC by name with no GPU yet wins.
    std::fs::remove_dir_all(scratch.0.join("class/infiniband/mlx5_3")).unwrap();
    let machine = Machine::read(&scratch.0).unwrap();
    let plan = plan(&machine, &PlanConfig::default()).unwrap();
    let gpu1 = plan.gpus[1].nic.as_ref().unwrap();
    assert_eq!((gpu1.name.as_str(), gpu1.relation), ("mlx5_1", Some(Relation::Node)));
}

#[test]
fn isolated_cores_and_the_callers_core_shape_the_choice() {
    let scratch = Scratch::of("dgx-h100", "isolated");
    std::fs::write(scratch.0.join("devices/system/cpu/isolated"), "1-8,57-64\n").unwrap();
    std::fs::write(scratch.0.join("devices/system/cpu/nohz_full"), "(null)\n").unwrap();
    let machine = Machine::read(&scratch.0).unwrap();
    let cfg = PlanConfig { avoid: vec![8], ..PlanConfig::default() };
    let plan = plan(&machine, &cfg).unwrap();
    let cores: Vec<usize> = plan.gpus.iter().flat_map(|g| g.cores.clone()).collect();
    assert_eq!(cores, vec![7, 6, 5, 4, 64, 63, 62, 61]);
}

#[test]
fn explicit_configuration_wins() {
    let machine = Machine::read(&fixture("dgx-h100")).unwrap();
    let cfg = PlanConfig {
        nic: Some("mlx5_1".into()),
        cores: Some((10..26).collect()),
        workers_per_gpu: 2,
        ..PlanConfig::default()
    };
    let plan = plan(&machine, &cfg).unwrap();
    assert!(plan
        .gpus
        .iter()
        .all(|g| g.nic.as_ref().unwrap().name == "mlx5_1" && g.nic.as_ref().unwrap().why == "configured"));
    assert_eq!(plan.gpus[0].cores, vec![10, 11]);
    assert_eq!(plan.gpus[7].cores, vec![24, 25]);
    let err =
        ferry_topology::plan::plan(&machine, &PlanConfig { nic: Some("mlx5_99".into()), ..PlanConfig::default() })
            .unwrap_err();
    match &err {
        ferry_topology::TopologyError::NicNotFound { name, known } => {
            assert_eq!(name, "mlx5_99");
            assert!(known.iter().any(|k| k == "mlx5_0"), "{err}");
        }
        other => panic!("expected NicNotFound, got {other}"),
    }
}

#[test]
fn two_workers_per_gpu_get_distinct_local_cores() {
    let machine = Machine::read(&fixture("dgx-h100")).unwrap();
    let plan = plan(&machine, &PlanConfig { workers_per_gpu: 2, ..PlanConfig::default() }).unwrap();
    let all: Vec<usize> = plan.gpus.iter().flat_map(|g| g.cores.clone()).collect();
    let mut unique = all.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!((all.len(), unique.len()), (16, 16));
    assert_eq!(plan.gpus[0].cores, vec![167, 166]);
}

#[test]
fn single_gpu_vm_without_rdma() {
    let machine = Machine::read(&fixture("h100-vm")).unwrap();
    assert_eq!(machine.gpus.len(), 1);
    assert_eq!(machine.gpus[0].address, "0000:00:06.0");
    assert_eq!(machine.gpus[0].numa_node, None, "numa_node -1 means unknown");
    assert!(machine.nics.is_empty());
    assert!(machine.other_network.iter().any(|n| n.vendor == 0x1af4), "the virtio NIC is seen, as a non-RDMA NIC");
    let plan = plan(&machine, &PlanConfig::default()).unwrap();
    assert_eq!(plan.gpus[0].nic, None);
    assert!(plan.notes.iter().any(|n| n.contains("no RDMA NIC")), "{:?}", plan.notes);
    let last = *machine.online.last().unwrap();
    assert_eq!(plan.gpus[0].cores, vec![last]);
}

#[test]
fn cpu_only_machine() {
    let machine = Machine::read(&fixture("cpu-only")).unwrap();
    assert!(machine.gpus.is_empty() && machine.nics.is_empty());
    let plan = plan(&machine, &PlanConfig::default()).unwrap();
    assert!(plan.gpus.is_empty());
    assert!(plan.notes.iter().any(|n| n.contains("no NVIDIA GPU")));
    let (cores, notes) = host_cores(&machine, 1, &[]);
    assert_eq!((cores, notes.len()), (vec![1], 0));
    // The caller sits on CPU 1: the only other CPU is 0, so CPU 1 is used after all, with a note.
    let (cores, notes) = host_cores(&machine, 1, &[1]);
    assert_eq!(cores, vec![1]);
    assert!(notes[0].contains("avoided"), "{notes:?}");
    let (cores, notes) = host_cores(&machine, 2, &[]);
    assert_eq!(cores, vec![1, 0]);
    assert!(notes[0].contains("CPU 0"), "{notes:?}");
}

#[test]
fn malformed_and_missing_files_never_panic() {
    let scratch = Scratch::of("dgx-h100", "broken");
    let devices = scratch.0.join("bus/pci/devices");
    std::fs::write(devices.join("0000:18:00.0/numa_node"), "garbage").unwrap();
    std::fs::write(devices.join("0000:2a:00.0/local_cpulist"), "9-3").unwrap();
    std::fs::remove_file(devices.join("0000:3a:00.0/class")).unwrap();
    std::fs::remove_file(scratch.0.join("class/infiniband/mlx5_4/ports/1/state")).unwrap();
    std::fs::remove_file(scratch.0.join("class/infiniband/mlx5_5/device")).unwrap();
    std::fs::remove_dir_all(scratch.0.join("devices/system/node/node1")).unwrap();
    let machine = Machine::read(&scratch.0).unwrap();
    assert_eq!(machine.gpus.len(), 7, "the GPU without a class file is left out");
    let text = machine.warnings.join("\n");
    assert!(text.contains("0000:18:00.0: numa_node is \"garbage\""), "{text}");
    assert!(text.contains("0000:2a:00.0: local_cpulist unusable"), "{text}");
    assert!(text.contains("0000:3a:00.0/class"), "{text}");
    let plan = plan(&machine, &PlanConfig::default()).unwrap();
    assert_eq!(plan.gpus.len(), 7);
    // mlx5_4 (no port state) and mlx5_5 (no PCI link) are still listed, never chosen first.
    assert!(plan.gpus.iter().all(|g| !matches!(g.nic.as_ref().map(|n| n.name.as_str()), Some("mlx5_4" | "mlx5_5"))));
    std::fs::remove_file(scratch.0.join("devices/system/cpu/online")).unwrap();
    let err = Machine::read(&scratch.0).unwrap_err();
    assert!(err.to_string().contains("devices/system/cpu/online"), "{err}");
}

#[test]
fn this_machine_reads_without_error() {
    let machine = Machine::read(Path::new("/sys")).unwrap();
    assert!(!machine.online.is_empty());
    plan(&machine, &PlanConfig::default()).unwrap();
}
