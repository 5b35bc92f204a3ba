//! Machine topology from sysfs, for ferry: which NIC and which cores serve each GPU.
//!
//! Every reader takes the sysfs root as an argument, so tests run on captured or constructed
//! trees under `fixtures/`. A file that is missing or malformed never panics: it is an error
//! naming the file, or an "unknown" (for example `numa_node = -1`), or, for one odd device
//! among many, a warning in [`Machine::warnings`] with the device left out.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cpu;
pub mod machine;
pub mod pci;
pub mod plan;
pub mod rdma;
pub mod relation;

pub use machine::Machine;
pub use plan::{GpuPlan, Plan, PlanConfig};
pub use relation::Relation;

/// A sysfs file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The plan's configuration names a NIC the machine does not have.
    #[error("configured NIC {name} not found (RDMA devices: {known:?})")]
    NicNotFound {
        /// The configured name.
        name: String,
        /// The RDMA devices found.
        known: Vec<String>,
    },
    /// A file held something unexpected.
    #[error("parsing {path}: {what}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong.
        what: String,
    },
}

pub(crate) fn read_trimmed(path: &std::path::Path) -> Result<String, TopologyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| TopologyError::Read { path: path.to_owned(), source })
}

/// Reads a file that may be absent: `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &std::path::Path) -> Result<Option<String>, TopologyError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read { path: path.to_owned(), source }),
    }
}
