//! Machine topology from sysfs, for ferry: online CPUs and PCI devices.
//!
//! Every reader takes the sysfs root as an argument, so tests run on captured trees.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cpu;
pub mod pci;

/// A sysfs file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
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
