//! PCI devices from `<sysfs>/bus/pci/devices/*/{vendor,class}`.

use crate::{read_trimmed, TopologyError};
use std::path::Path;

/// NVIDIA's PCI vendor id.
pub const VENDOR_NVIDIA: u16 = 0x10de;

/// One PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Bus id, such as `0000:00:06.0`.
    pub address: String,
    /// Vendor id.
    pub vendor: u16,
    /// Class code (24 bits: class, subclass, programming interface).
    pub class: u32,
}

impl PciDevice {
    /// A display (0x0300) or 3D (0x0302) controller from NVIDIA.
    pub fn is_nvidia_gpu(&self) -> bool {
        self.vendor == VENDOR_NVIDIA && matches!(self.class >> 8, 0x0300 | 0x0302)
    }
}

fn parse_hex(path: &Path) -> Result<u32, TopologyError> {
    let text = read_trimmed(path)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16)
        .map_err(|_| TopologyError::Parse { path: path.to_owned(), what: format!("not hex: {text:?}") })
}

/// Every PCI function under `<sysfs>/bus/pci/devices`, sorted by address. A machine without
/// PCI (the directory is missing) has none.
pub fn devices(sysfs: &Path) -> Result<Vec<PciDevice>, TopologyError> {
    let dir = sysfs.join("bus/pci/devices");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TopologyError::Read { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Read { path: dir.clone(), source })?;
        let path = entry.path();
        let vendor = parse_hex(&path.join("vendor"))?;
        let vendor = u16::try_from(vendor).map_err(|_| TopologyError::Parse {
            path: path.join("vendor"),
            what: format!("{vendor:#x} is over 16 bits"),
        })?;
        out.push(PciDevice {
            address: entry.file_name().to_string_lossy().into_owned(),
            vendor,
            class: parse_hex(&path.join("class"))?,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(root: &Path, address: &str, vendor: &str, class: &str) {
        let dir = root.join("bus/pci/devices").join(address);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vendor"), vendor).unwrap();
        std::fs::write(dir.join("class"), class).unwrap();
    }

    #[test]
    fn finds_an_nvidia_gpu_among_others() {
        let root = std::env::temp_dir().join(format!("ferry-pci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fake(&root, "0000:00:06.0", "0x10de\n", "0x030200\n");
        fake(&root, "0000:00:03.0", "0x1af4\n", "0x020000\n");
        let devs = devices(&root).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].address, "0000:00:03.0");
        assert!(!devs[0].is_nvidia_gpu());
        assert!(devs[1].is_nvidia_gpu());
        fake(&root, "0000:00:07.0", "garbage", "0x030000");
        assert!(devices(&root).unwrap_err().to_string().contains("0000:00:07.0/vendor"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_pci_bus_means_no_devices() {
        assert!(devices(Path::new("/nonexistent-sysfs")).unwrap().is_empty());
    }
}
