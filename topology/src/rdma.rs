//! RDMA devices from `<sysfs>/class/infiniband/*`: their PCI function, ports, port states and
//! GIDs.

use crate::{read_optional, TopologyError};
use std::path::Path;

/// One port of an RDMA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port number (from 1).
    pub number: u32,
    /// State text, such as "4: ACTIVE" (empty when unreadable).
    pub state: String,
    /// "InfiniBand" or "Ethernet" (empty when unreadable).
    pub link_layer: String,
    /// Non-zero GIDs: (index, address, type such as "RoCE v2"; type empty when not given).
    pub gids: Vec<(u32, String, String)>,
}

impl Port {
    /// The state without its number ("ACTIVE" for "4: ACTIVE").
    pub fn state_name(&self) -> &str {
        self.state.split_once(": ").map_or(self.state.as_str(), |(_, name)| name)
    }

    /// Whether the port is up.
    pub fn is_active(&self) -> bool {
        self.state.ends_with("ACTIVE")
    }
}

/// An RDMA device (`mlx5_0`, `rxe0`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaDevice {
    /// Device name.
    pub name: String,
    /// PCI address of its function; `None` for software devices (rxe, siw).
    pub pci: Option<String>,
    /// Ports.
    pub ports: Vec<Port>,
}

/// Sort key that orders `mlx5_2` before `mlx5_10`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, number) = name.split_at(name.len() - digits);
    (stem.to_owned(), number.parse().unwrap_or(0))
}

fn sorted_entries(dir: &Path) -> Result<Vec<String>, TopologyError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> =
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort_by_key(|n| natural_key(n));
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(TopologyError::Read { path: dir.to_owned(), source }),
    }
}

fn read_port(dir: &Path, number: u32) -> Result<Port, TopologyError> {
    let mut gids = Vec::new();
    for index in sorted_entries(&dir.join("gids"))? {
        let Ok(i) = index.parse::<u32>() else { continue };
        let Some(gid) = read_optional(&dir.join("gids").join(&index))? else { continue };
        if gid.chars().all(|c| c == '0' || c == ':') {
            continue;
        }
        // Reading the type of an unused GID fails with EINVAL on real devices: treat as unknown.
        let kind = read_optional(&dir.join("gid_attrs/types").join(&index)).ok().flatten().unwrap_or_default();
        gids.push((i, gid, kind));
    }
    gids.sort();
    Ok(Port {
        number,
        state: read_optional(&dir.join("state"))?.unwrap_or_default(),
        link_layer: read_optional(&dir.join("link_layer"))?.unwrap_or_default(),
        gids,
    })
}

/// Every RDMA device under `<sysfs>/class/infiniband`, by name.
pub fn devices(sysfs: &Path) -> Result<Vec<RdmaDevice>, TopologyError> {
    let class = sysfs.join("class/infiniband");
    let mut out = Vec::new();
    for name in sorted_entries(&class)? {
        let dir = class.join(&name);
        // `device` links to the PCI function; software devices have none, or a non-PCI one.
        let pci = std::fs::canonicalize(dir.join("device"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .filter(|f| f.len() == 12 && f.as_bytes()[4] == b':' && f.as_bytes()[7] == b':');
        let mut ports = Vec::new();
        for port in sorted_entries(&dir.join("ports"))? {
            if let Ok(number) = port.parse() {
                ports.push(read_port(&dir.join("ports").join(&port), number)?);
            }
        }
        out.push(RdmaDevice { name, pci, ports });
    }
    Ok(out)
}
