//! CPU lists (`0-3,8,10-11`), as in `/sys/devices/system/cpu/online` and `local_cpulist`.

use crate::{read_trimmed, TopologyError};
use std::path::Path;

/// Parses a kernel CPU list. An empty list is valid and yields no CPUs.
pub fn parse_cpulist(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: usize = lo.trim().parse().map_err(|_| format!("bad CPU number {lo:?} in {text:?}"))?;
        let hi: usize = hi.trim().parse().map_err(|_| format!("bad CPU number {hi:?} in {text:?}"))?;
        if hi < lo || hi - lo > 1 << 16 {
            return Err(format!("bad CPU range {part:?} in {text:?}"));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Online CPUs, from `<sysfs>/devices/system/cpu/online`.
pub fn online_cpus(sysfs: &Path) -> Result<Vec<usize>, TopologyError> {
    let path = sysfs.join("devices/system/cpu/online");
    let text = read_trimmed(&path)?;
    parse_cpulist(&text).map_err(|what| TopologyError::Parse { path, what })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_singles() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("1").unwrap(), vec![1]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_cpulist("a-b").is_err());
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("0-99999999").is_err());
    }

    #[test]
    fn reads_this_machine() {
        let cpus = online_cpus(Path::new("/sys")).unwrap();
        assert!(!cpus.is_empty());
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = online_cpus(Path::new("/nonexistent-sysfs")).unwrap_err();
        assert!(err.to_string().contains("devices/system/cpu/online"), "{err}");
    }
}
