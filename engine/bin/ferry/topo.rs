//! `ferry topo`: the GPU x NIC matrix in the style of `nvidia-smi topo -m`, then the plan.

use ferry_topology::cpu::format_cpulist;
use ferry_topology::{Machine, Plan};
use std::fmt::Write;

/// Renders the matrix, the legend, the plan, and any notes and warnings.
pub fn render(machine: &Machine, plan: &Plan) -> String {
    let mut out = String::new();
    let names: Vec<&str> = machine.nics.iter().map(|n| n.rdma.name.as_str()).collect();
    let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4) + 2;
    if machine.gpus.is_empty() {
        out.push_str("no NVIDIA GPU\n");
    } else {
        let _ = write!(out, "{:<8}", "");
        for name in &names {
            let _ = write!(out, "{name:<width$}");
        }
        let _ = writeln!(out, "{:<22}{:<6}PCI", "CPU affinity", "NUMA");
        for (g, gpu) in machine.gpus.iter().enumerate() {
            let _ = write!(out, "{:<8}", format!("GPU{g}"));
            for n in 0..names.len() {
                let label = machine.relation(g, n).map_or("-", |r| r.label());
                let _ = write!(out, "{label:<width$}");
            }
            let numa = gpu.numa_node.map_or("N/A".to_owned(), |n| n.to_string());
            let _ = writeln!(out, "{:<22}{:<6}{}", format_cpulist(&machine.local_cpus(gpu)), numa, gpu.address);
        }
        if names.is_empty() {
            out.push_str("no RDMA NIC\n");
        }
        out.push_str(
            "\nLegend: PIX = at most one PCIe switch between; PXB = several switches; PHB = through a PCIe host bridge;\n        \
             NODE = between host bridges of one NUMA node; SYS = across NUMA nodes, or NUMA unknown; - = software NIC\n",
        );
    }
    for nic in &machine.nics {
        let ports: Vec<String> =
            nic.rdma.ports.iter().map(|p| format!("port {} {} {}", p.number, p.state_name(), p.link_layer)).collect();
        let pci = nic.pci.as_ref().map_or("no PCI function".to_owned(), |p| p.address.clone());
        let _ = writeln!(
            out,
            "NIC {}: {pci}, {}",
            nic.rdma.name,
            if ports.is_empty() { "no ports".into() } else { ports.join(", ") }
        );
    }
    for other in &machine.other_network {
        let _ = writeln!(out, "network function {} (vendor {:#06x}): no RDMA device", other.address, other.vendor);
    }
    out.push_str("\nPlan:\n");
    for (g, p) in plan.gpus.iter().enumerate() {
        let nic = match &p.nic {
            Some(n) => match n.relation {
                Some(r) => format!("NIC {} ({r}, {})", n.name, n.why),
                None => format!("NIC {} ({})", n.name, n.why),
            },
            None => "no NIC".to_owned(),
        };
        let numa = p.numa_node.map_or("NUMA unknown".to_owned(), |n| format!("NUMA {n}"));
        let _ = writeln!(out, "  GPU{g} {} ({numa}): {nic}; worker cores {}", p.gpu, format_cpulist(&p.cores));
        for note in &p.notes {
            let _ = writeln!(out, "    note: {note}");
        }
    }
    for note in &plan.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    for warning in &machine.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}
