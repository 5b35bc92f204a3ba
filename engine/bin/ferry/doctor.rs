//! `ferry doctor`: checks what the GPU transports need and says how to fix what is missing.

use ferry::internals::cuda::{Device, Driver, BATCH_COPY_VERSION};
use ferry_topology::cpu::format_cpulist;
use ferry_topology::Machine;
use std::fmt::Write;
use std::path::Path;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but not as well as it could.
    Warn,
    /// Missing: the feature that needs it is unavailable.
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Outcome.
    pub level: Level,
    /// What was checked and found.
    pub what: String,
    /// How to fix it (for WARN and FAIL).
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Check {
    Check { level: Level::Ok, what: what.into(), fix: None }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { level: Level::Warn, what: what.into(), fix: Some(fix.into()) }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { level: Level::Fail, what: what.into(), fix: Some(fix.into()) }
}

/// The doctor's findings.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// One line per GPU: the transport ferry would use and why.
    pub decisions: Vec<String>,
}

/// Runs every check against the machine under `sysfs` (and this process's view of /proc and
/// the dynamic loader).
pub fn run(sysfs: &Path) -> Report {
    let mut r = Report::default();
    let machine = match Machine::read(sysfs) {
        Ok(m) => m,
        Err(e) => {
            r.checks
                .push(fail(format!("machine topology: {e}"), "run on Linux with sysfs mounted, or pass --sysfs DIR"));
            return r;
        }
    };
    let verbs = ferry::internals::sys::library_loads("libibverbs.so.1");
    r.checks.push(match &verbs {
        Ok(()) => ok("libibverbs.so.1 loads"),
        Err(e) => fail(
            format!("libibverbs.so.1 does not load: {e}"),
            "install libibverbs1 and ibverbs-providers (Debian/Ubuntu)",
        ),
    });
    check_nics(&machine, sysfs, &mut r);
    let driver = Driver::load();
    let devices = match &driver {
        Ok(d) => {
            r.checks.push(if d.version() >= BATCH_COPY_VERSION {
                ok(format!("CUDA driver {} loads", d.version_text()))
            } else {
                warn(
                    format!("CUDA driver {} loads; batched copies need 12.8", d.version_text()),
                    "update the NVIDIA driver to 570 or newer for cuMemcpyBatchAsync",
                )
            });
            match d.devices() {
                Ok(devices) => devices,
                Err(e) => {
                    r.checks.push(fail(format!("listing CUDA devices: {e}"), "check `nvidia-smi`"));
                    Vec::new()
                }
            }
        }
        Err(e) => {
            r.checks
                .push(fail(format!("CUDA driver: {e}"), "install the NVIDIA driver; without it only host copies run"));
            Vec::new()
        }
    };
    for d in &devices {
        r.checks.push(if d.gpudirect_rdma && d.dma_buf {
            ok(format!("GPU {} ({}, {}): GPUDirect RDMA and dma-buf supported", d.ordinal, d.name, d.pci_bus_id))
        } else {
            warn(
                format!(
                    "GPU {} ({}): GPUDirect RDMA {}, dma-buf {}",
                    d.ordinal,
                    d.pci_bus_id,
                    yes(d.gpudirect_rdma),
                    yes(d.dma_buf)
                ),
                "GDR needs a data-center GPU and the open kernel modules (dma-buf) or nvidia-peermem",
            )
        });
    }
    r.checks.push(if sysfs.join("module/nvidia_peermem").exists() {
        ok("nvidia-peermem is loaded")
    } else {
        warn(
            "nvidia-peermem is not loaded (only needed where dma-buf registration is unavailable)",
            "modprobe nvidia-peermem",
        )
    });
    r.checks.push(match ferry::internals::sys::memlock_limit() {
        Ok(None) => ok("RLIMIT_MEMLOCK is unlimited"),
        Ok(Some(n)) if n >= 1 << 30 => ok(format!("RLIMIT_MEMLOCK is {} MiB", n >> 20)),
        Ok(Some(n)) => warn(
            format!("RLIMIT_MEMLOCK is {} KiB: registering memory with a NIC pins it", n >> 10),
            "ulimit -l unlimited (or memlock in /etc/security/limits.conf, LimitMEMLOCK= for systemd units)",
        ),
        Err(e) => warn(format!("RLIMIT_MEMLOCK unknown: {e}"), "check `ulimit -l`"),
    });
    r.checks.push(huge_pages(sysfs));
    r.checks.push(if machine.isolated.is_empty() {
        warn(
            "no isolated CPUs: workers share their cores with the scheduler",
            "for the lowest jitter boot with isolcpus=<cores> nohz_full=<cores> on cores near the GPU",
        )
    } else {
        ok(format!("isolated CPUs: {}", format_cpulist(&machine.isolated)))
    });
    decide(&machine, &devices, verbs.is_ok(), driver.is_ok(), &mut r);
    r
}

fn yes(b: bool) -> &'static str {
    if b {
        "supported"
    } else {
        "not supported"
    }
}

fn check_nics(machine: &Machine, sysfs: &Path, r: &mut Report) {
    if machine.nics.is_empty() {
        r.checks.push(fail(
            format!("no RDMA device under {}", sysfs.join("class/infiniband").display()),
            "GPUDirect RDMA needs an RDMA NIC (ConnectX-6 or newer) with its kernel driver (mlx5_ib); without one ferry uses CUDA copies",
        ));
        return;
    }
    for nic in &machine.nics {
        for port in &nic.rdma.ports {
            let name = format!("{} port {}", nic.rdma.name, port.number);
            r.checks.push(if port.is_active() {
                ok(format!("{name}: {} ({})", port.state_name(), port.link_layer))
            } else {
                warn(
                    format!("{name}: state {:?}", port.state),
                    "check the link (ibstat, ip link) and, for InfiniBand, that a subnet manager runs",
                )
            });
            let roce = port.gids.iter().filter(|g| g.2 == "RoCE v2").count();
            r.checks.push(match (port.gids.len(), port.link_layer.as_str()) {
                (0, _) => warn(
                    format!("{name}: no usable GID"),
                    "for RoCE, bring the netdev up with an IPv6 link-local or an IP address",
                ),
                (n, "Ethernet") if roce == 0 => warn(
                    format!("{name}: {n} GIDs, none RoCE v2"),
                    "enable RoCE v2 (cma_roce_mode, or the netdev's IP address)",
                ),
                (n, _) => ok(format!("{name}: {n} usable GIDs ({roce} RoCE v2)")),
            });
        }
    }
}

fn huge_pages(sysfs: &Path) -> Check {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("HugePages_Total:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    let thp = std::fs::read_to_string(sysfs.join("kernel/mm/transparent_hugepage/enabled")).ok();
    let thp_mode = thp.as_deref().and_then(|t| t.split('[').nth(1)?.split(']').next()).unwrap_or("unknown");
    match total {
        Some(n) if n > 0 => ok(format!("{n} huge pages reserved; transparent huge pages: {thp_mode}")),
        _ if thp_mode == "always" || thp_mode == "madvise" => ok(format!("no reserved huge pages; transparent huge pages: {thp_mode}")),
        _ => warn(
            format!("no huge pages (transparent huge pages: {thp_mode})"),
            "large registrations translate better with huge pages: echo madvise > /sys/kernel/mm/transparent_hugepage/enabled",
        ),
    }
}

/// Which transport each GPU would get, and why.
fn decide(machine: &Machine, devices: &[Device], verbs: bool, cuda: bool, r: &mut Report) {
    let plan = ferry_topology::plan::plan(machine, &Default::default()).unwrap_or_default();
    if machine.gpus.is_empty() && devices.is_empty() {
        r.decisions.push("no GPU: ferry runs the host transport (host-to-host copies)".into());
        return;
    }
    for (g, gpu) in machine.gpus.iter().enumerate() {
        let device = devices.iter().find(|d| d.pci_bus_id == gpu.address);
        let nic = plan.gpus.get(g).and_then(|p| p.nic.as_ref());
        let gdr_ready = verbs && nic.is_some() && device.is_some_and(|d| d.gpudirect_rdma || d.dma_buf);
        let decision = if cuda && device.is_some() {
            if gdr_ready {
                format!(
                    "cuda: GPUDirect RDMA through {} is possible here, but this build has no gdr transport yet",
                    nic.map_or("?", |n| n.name.as_str())
                )
            } else {
                let why = if !verbs {
                    "libibverbs missing"
                } else if nic.is_none() {
                    "no RDMA NIC"
                } else {
                    "the GPU lacks GPUDirect RDMA and dma-buf"
                };
                format!("cuda ({why}; the gdr transport would need it)")
            }
        } else {
            "host: no usable CUDA driver for this GPU, copies are host to host only".into()
        };
        r.decisions.push(format!("GPU{g} {}: {decision}", gpu.address));
    }
}

impl Report {
    /// The report as text: one line per check, then the decisions and a count.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.level {
                Level::Ok => "OK",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag:<5} {}", c.what);
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "      fix: {fix}");
            }
        }
        out.push_str("\nTransport per GPU:\n");
        for d in &self.decisions {
            let _ = writeln!(out, "  {d}");
        }
        let count = |l| self.checks.iter().filter(|c| c.level == l).count();
        let _ = writeln!(out, "\n{} OK, {} WARN, {} FAIL", count(Level::Ok), count(Level::Warn), count(Level::Fail));
        out
    }
}
