//! A snapshot of the machine: CPUs, GPUs, RDMA NICs, other network devices.

use crate::cpu::{isolated_cpus, node_cpus, online_cpus};
use crate::pci::{self, PciDevice};
use crate::rdma::{self, RdmaDevice};
use crate::relation::{relation, Relation};
use crate::TopologyError;
use std::collections::BTreeMap;
use std::path::Path;

/// An RDMA NIC and, when it is a PCI function, that function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The RDMA device.
    pub rdma: RdmaDevice,
    /// Its PCI function (`None` for software devices such as rxe).
    pub pci: Option<PciDevice>,
}

/// What ferry needs to know of a machine.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    /// Online CPUs.
    pub online: Vec<usize>,
    /// CPUs isolated from the scheduler or its tick (`isolcpus`, `nohz_full`).
    pub isolated: Vec<usize>,
    /// NVIDIA GPUs, by PCI address (GPU `i` of this list is not necessarily CUDA ordinal `i`:
    /// map ordinals through their PCI bus ids).
    pub gpus: Vec<PciDevice>,
    /// RDMA devices, by name.
    pub nics: Vec<Nic>,
    /// Network functions without an RDMA device (for reports).
    pub other_network: Vec<PciDevice>,
    /// CPUs of each NUMA node that sysfs describes.
    pub node_cpus: BTreeMap<u32, Vec<usize>>,
    /// Devices or files that could not be read, and what was done instead.
    pub warnings: Vec<String>,
}

impl Machine {
    /// Reads the machine under `sysfs` (normally `/sys`). Only an unreadable online CPU list is
    /// an error; anything else missing becomes "unknown" or a warning.
    pub fn read(sysfs: &Path) -> Result<Machine, TopologyError> {
        let online = online_cpus(sysfs)?;
        let mut warnings = Vec::new();
        let isolated = isolated_cpus(sysfs).unwrap_or_else(|e| {
            warnings.push(format!("isolated CPUs unknown: {e}"));
            Vec::new()
        });
        let (devices, pci_warnings) =
            pci::devices(sysfs).unwrap_or_else(|e| (Vec::new(), vec![format!("PCI devices unknown: {e}")]));
        warnings.extend(pci_warnings);
        let rdma = rdma::devices(sysfs).unwrap_or_else(|e| {
            warnings.push(format!("RDMA devices unknown: {e}"));
            Vec::new()
        });
        let mut node_cpus = BTreeMap::new();
        for node in devices.iter().filter_map(|d| d.numa_node).collect::<std::collections::BTreeSet<_>>() {
            match self::node_cpus(sysfs, node) {
                Ok(Some(cpus)) => {
                    node_cpus.insert(node, cpus);
                }
                Ok(None) => {}
                Err(e) => warnings.push(format!("CPUs of NUMA node {node} unknown: {e}")),
            }
        }
        let gpus: Vec<PciDevice> = devices.iter().filter(|d| d.is_nvidia_gpu()).cloned().collect();
        let nics: Vec<Nic> = rdma
            .into_iter()
            .map(|r| {
                let pci = r.pci.as_ref().and_then(|a| devices.iter().find(|d| &d.address == a).cloned());
                Nic { rdma: r, pci }
            })
            .collect();
        let rdma_functions: Vec<&str> =
            nics.iter().filter_map(|n| n.pci.as_ref()).map(|p| p.address.as_str()).collect();
        let other_network = devices
            .iter()
            .filter(|d| d.is_network() && !rdma_functions.contains(&d.address.as_str()))
            .cloned()
            .collect();
        Ok(Machine { online, isolated, gpus, nics, other_network, node_cpus, warnings })
    }

    /// The relation between GPU `gpu` and NIC `nic` (indices into the lists). A software NIC
    /// (no PCI function) is `None`.
    pub fn relation(&self, gpu: usize, nic: usize) -> Option<Relation> {
        Some(relation(&self.gpus[gpu], self.nics[nic].pci.as_ref()?))
    }

    /// CPUs local to a device: its `local_cpulist`, else its NUMA node's CPUs, else every
    /// online CPU; always within the online CPUs.
    pub fn local_cpus(&self, device: &PciDevice) -> Vec<usize> {
        let from_node = device.numa_node.and_then(|n| self.node_cpus.get(&n)).cloned();
        let local = Some(device.local_cpus.clone())
            .filter(|c| !c.is_empty())
            .or(from_node)
            .unwrap_or_else(|| self.online.clone());
        let local: Vec<usize> = local.into_iter().filter(|c| self.online.contains(c)).collect();
        if local.is_empty() {
            self.online.clone()
        } else {
            local
        }
    }
}
