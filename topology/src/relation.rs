//! How far apart two PCI devices are, in the classes `nvidia-smi topo -m` prints.

use crate::pci::PciDevice;

/// The connection between two devices, nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Relation {
    /// At most one PCIe switch between them (both below one switch).
    Pix,
    /// Several PCIe switches, without crossing the host bridge.
    Pxb,
    /// Through a PCIe host bridge (the CPU's root complex).
    Phb,
    /// Between host bridges of one NUMA node.
    Node,
    /// Across NUMA nodes (the SMP interconnect), or NUMA placement unknown.
    Sys,
}

impl Relation {
    /// The label nvidia-smi uses.
    pub fn label(self) -> &'static str {
        match self {
            Relation::Pix => "PIX",
            Relation::Pxb => "PXB",
            Relation::Phb => "PHB",
            Relation::Node => "NODE",
            Relation::Sys => "SYS",
        }
    }
}

impl std::fmt::Display for Relation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The relation of `a` and `b` from their bridge paths.
///
/// Below one host bridge: let `c` be their deepest common ancestor. When `c` is the host
/// bridge itself the path crosses it (PHB). Otherwise, when neither device is more than two
/// levels below `c` (both hang off the downstream ports of the one switch whose upstream port,
/// or downstream port, is `c`) it is PIX, else PXB. Under different host bridges it is NODE
/// when both devices report the same NUMA node, else SYS (including unknown nodes).
pub fn relation(a: &PciDevice, b: &PciDevice) -> Relation {
    let hierarchy_known = a.path.len() >= 2 && b.path.len() >= 2;
    if !hierarchy_known || a.path[0] != b.path[0] {
        return match (a.numa_node, b.numa_node) {
            (Some(x), Some(y)) if x == y => Relation::Node,
            _ => Relation::Sys,
        };
    }
    let (pa, pb) = (&a.path[..a.path.len() - 1], &b.path[..b.path.len() - 1]);
    let common = pa.iter().zip(pb).take_while(|(x, y)| x == y).count();
    if common == 1 {
        return Relation::Phb;
    }
    // Levels from the common ancestor down to each device (the device included).
    if a.path.len() - common <= 2 && b.path.len() - common <= 2 {
        Relation::Pix
    } else {
        Relation::Pxb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(path: &[&str], numa: Option<u32>) -> PciDevice {
        PciDevice {
            address: path.last().unwrap().to_string(),
            vendor: 0,
            device: 0,
            class: 0,
            numa_node: numa,
            local_cpus: vec![],
            path: path.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn classes_from_paths() {
        let gpu = dev(&["pci0000:15", "0000:15:01.0", "0000:16:00.0", "0000:17:00.0", "0000:18:00.0"], Some(0));
        let nic_same_switch =
            dev(&["pci0000:15", "0000:15:01.0", "0000:16:00.0", "0000:17:01.0", "0000:19:00.0"], Some(0));
        let nic_same_port =
            dev(&["pci0000:15", "0000:15:01.0", "0000:16:00.0", "0000:17:00.0", "0000:18:00.1"], Some(0));
        let nic_two_switches = dev(
            &[
                "pci0000:15",
                "0000:15:01.0",
                "0000:16:00.0",
                "0000:17:02.0",
                "0000:1a:00.0",
                "0000:1b:00.0",
                "0000:1c:00.0",
            ],
            Some(0),
        );
        let nic_other_root_port = dev(&["pci0000:15", "0000:15:02.0", "0000:20:00.0"], Some(0));
        let nic_other_bridge_same_node = dev(&["pci0000:27", "0000:27:01.0", "0000:28:00.0"], Some(0));
        let nic_other_node = dev(&["pci0000:97", "0000:97:01.0", "0000:98:00.0"], Some(1));
        let flat_unknown = dev(&["0000:00:03.0"], None);
        assert_eq!(relation(&gpu, &nic_same_switch), Relation::Pix);
        assert_eq!(relation(&gpu, &nic_same_port), Relation::Pix);
        assert_eq!(relation(&gpu, &nic_two_switches), Relation::Pxb);
        assert_eq!(relation(&gpu, &nic_other_root_port), Relation::Phb);
        assert_eq!(relation(&gpu, &nic_other_bridge_same_node), Relation::Node);
        assert_eq!(relation(&gpu, &nic_other_node), Relation::Sys);
        assert_eq!(relation(&gpu, &flat_unknown), Relation::Sys);
        assert_eq!(relation(&nic_same_switch, &gpu), Relation::Pix, "symmetric");
        assert!(Relation::Pix < Relation::Pxb && Relation::Node < Relation::Sys);
    }
}
