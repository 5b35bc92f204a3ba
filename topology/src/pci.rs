//! PCI devices from `<sysfs>/bus/pci/devices/*`: ids, class, NUMA node, local CPUs, and the
//! chain of bridges above each (the directories of its real path under `<sysfs>/devices`).

use crate::cpu::parse_cpulist;
use crate::{read_optional, read_trimmed, TopologyError};
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
    /// Device id (0 when unreadable).
    pub device: u16,
    /// Class code (24 bits: class, subclass, programming interface).
    pub class: u32,
    /// NUMA node; `None` where sysfs says -1 (no information) or says nothing.
    pub numa_node: Option<u32>,
    /// CPUs local to the device (empty: unknown).
    pub local_cpus: Vec<usize>,
    /// Directories from the host bridge down to the device itself, for example
    /// `["pci0000:15", "0000:15:01.0", "0000:16:00.0", "0000:17:00.0", "0000:18:00.0"]`.
    /// Just `[address]` when sysfs does not show the hierarchy.
    pub path: Vec<String>,
}

impl PciDevice {
    /// A display (0x0300) or 3D (0x0302) controller from NVIDIA.
    pub fn is_nvidia_gpu(&self) -> bool {
        self.vendor == VENDOR_NVIDIA && matches!(self.class >> 8, 0x0300 | 0x0302)
    }

    /// An Ethernet (0x0200) or InfiniBand (0x0207) controller.
    pub fn is_network(&self) -> bool {
        matches!(self.class >> 8, 0x0200 | 0x0207)
    }
}

fn parse_hex(path: &Path) -> Result<u32, TopologyError> {
    let text = read_trimmed(path)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16)
        .map_err(|_| TopologyError::Parse { path: path.to_owned(), what: format!("not hex: {text:?}") })
}

fn parse_u16(path: &Path) -> Result<u16, TopologyError> {
    let value = parse_hex(path)?;
    u16::try_from(value)
        .map_err(|_| TopologyError::Parse { path: path.to_owned(), what: format!("{value:#x} is over 16 bits") })
}

/// Reads one device directory (`<sysfs>/bus/pci/devices/<address>`). An unreadable vendor or
/// class is an error; an unreadable NUMA node or CPU list is "unknown", with a warning.
pub fn read_device(sysfs: &Path, address: &str) -> Result<(PciDevice, Vec<String>), TopologyError> {
    let dir = sysfs.join("bus/pci/devices").join(address);
    let mut warnings = Vec::new();
    let numa_node = match read_optional(&dir.join("numa_node")) {
        Ok(Some(text)) => match text.parse::<i64>() {
            Ok(n) => u32::try_from(n).ok(), // -1: no information
            Err(_) => {
                warnings.push(format!("{address}: numa_node is {text:?}, not a number: NUMA node unknown"));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            warnings.push(format!("{address}: NUMA node unknown: {e}"));
            None
        }
    };
    let local_cpus = match read_optional(&dir.join("local_cpulist")) {
        Ok(Some(text)) => parse_cpulist(&text).unwrap_or_else(|what| {
            warnings.push(format!("{address}: local_cpulist unusable ({what}): local CPUs unknown"));
            Vec::new()
        }),
        Ok(None) => Vec::new(),
        Err(e) => {
            warnings.push(format!("{address}: local CPUs unknown: {e}"));
            Vec::new()
        }
    };
    let device = PciDevice {
        address: address.to_owned(),
        vendor: parse_u16(&dir.join("vendor"))?,
        device: parse_u16(&dir.join("device")).unwrap_or(0),
        class: parse_hex(&dir.join("class"))?,
        numa_node,
        local_cpus,
        path: bridge_path(sysfs, address),
    };
    Ok((device, warnings))
}

/// The directories between `<sysfs>/devices` and the device, following the bus symlink.
fn bridge_path(sysfs: &Path, address: &str) -> Vec<String> {
    let link = sysfs.join("bus/pci/devices").join(address);
    let devices = sysfs.join("devices").canonicalize().ok();
    let real = link.canonicalize().ok();
    match (devices, real) {
        (Some(devices), Some(real)) => match real.strip_prefix(&devices) {
            Ok(rest) => {
                let parts: Vec<String> = rest.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                if parts.len() >= 2 && parts[0].starts_with("pci") {
                    parts
                } else {
                    vec![address.to_owned()]
                }
            }
            Err(_) => vec![address.to_owned()],
        },
        _ => vec![address.to_owned()],
    }
}

/// Every PCI function under `<sysfs>/bus/pci/devices`, sorted by address, and a warning for
/// each device that could not be read (left out). No PCI bus (the folder is missing) means no
/// devices.
pub fn devices(sysfs: &Path) -> Result<(Vec<PciDevice>, Vec<String>), TopologyError> {
    let dir = sysfs.join("bus/pci/devices");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(source) => return Err(TopologyError::Read { path: dir, source }),
    };
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Read { path: dir.clone(), source })?;
        let address = entry.file_name().to_string_lossy().into_owned();
        match read_device(sysfs, &address) {
            Ok((device, device_warnings)) => {
                out.push(device);
                warnings.extend(device_warnings);
            }
            Err(e) => warnings.push(format!("PCI device {address} left out: {e}")),
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok((out, warnings))
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
    fn reads_flat_devices_and_warns_about_broken_ones() {
        let root = std::env::temp_dir().join(format!("ferry-pci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fake(&root, "0000:00:06.0", "0x10de\n", "0x030200\n");
        fake(&root, "0000:00:03.0", "0x1af4\n", "0x020000\n");
        fake(&root, "0000:00:07.0", "garbage", "0x030000");
        std::fs::write(root.join("bus/pci/devices/0000:00:06.0/numa_node"), "-1\n").unwrap();
        std::fs::write(root.join("bus/pci/devices/0000:00:03.0/numa_node"), "zero\n").unwrap();
        let (devs, warnings) = devices(&root).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].address, "0000:00:03.0");
        assert!(devs[0].is_network() && !devs[0].is_nvidia_gpu());
        assert!(devs[1].is_nvidia_gpu());
        assert_eq!(devs[1].numa_node, None);
        assert_eq!(devs[1].path, vec!["0000:00:06.0".to_owned()]);
        assert_eq!(devs[0].numa_node, None);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("0000:00:07.0/vendor")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("numa_node is \"zero\"")), "{warnings:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_pci_bus_means_no_devices() {
        assert!(devices(Path::new("/nonexistent-sysfs")).unwrap().0.is_empty());
    }
}
