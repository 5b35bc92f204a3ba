//! CPU lists (`0-3,8,10-11`): online CPUs, isolated CPUs, a device's `local_cpulist`.

use crate::{read_optional, read_trimmed, TopologyError};
use std::path::Path;

/// Parses a kernel CPU list. An empty list is valid and yields no CPUs.
pub fn parse_cpulist(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
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

/// Formats CPUs, in any order, as a kernel CPU list (`0-3,8`).
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut cpus = cpus.to_vec();
    cpus.sort_unstable();
    cpus.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start { start.to_string() } else { format!("{start}-{}", cpus[i]) });
        i += 1;
    }
    out.join(",")
}

fn read_list(path: &Path) -> Result<Vec<usize>, TopologyError> {
    let text = read_trimmed(path)?;
    parse_cpulist(&text).map_err(|what| TopologyError::Parse { path: path.to_owned(), what })
}

/// Online CPUs, from `<sysfs>/devices/system/cpu/online`.
pub fn online_cpus(sysfs: &Path) -> Result<Vec<usize>, TopologyError> {
    read_list(&sysfs.join("devices/system/cpu/online"))
}

/// CPUs the kernel keeps the scheduler or its tick off (`isolcpus=`, `nohz_full=`), from
/// `<sysfs>/devices/system/cpu/{isolated,nohz_full}`. Absent files mean none.
pub fn isolated_cpus(sysfs: &Path) -> Result<Vec<usize>, TopologyError> {
    let mut cpus = Vec::new();
    for name in ["isolated", "nohz_full"] {
        let path = sysfs.join("devices/system/cpu").join(name);
        // nohz_full reads "(null)" when the feature is off.
        if let Some(text) = read_optional(&path)?.filter(|t| t != "(null)") {
            cpus.extend(parse_cpulist(&text).map_err(|what| TopologyError::Parse { path, what })?);
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// CPUs of NUMA node `node`, from `<sysfs>/devices/system/node/node<N>/cpulist`; `None` when
/// the node is not described.
pub fn node_cpus(sysfs: &Path, node: u32) -> Result<Option<Vec<usize>>, TopologyError> {
    let path = sysfs.join(format!("devices/system/node/node{node}/cpulist"));
    match read_optional(&path)? {
        Some(text) => parse_cpulist(&text).map(Some).map_err(|what| TopologyError::Parse { path, what }),
        None => Ok(None),
    }
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
    fn formats_what_it_parses() {
        for text in ["0-3,8,10-11", "5", "", "0-55,112-167"] {
            assert_eq!(format_cpulist(&parse_cpulist(text).unwrap()), text);
        }
        assert_eq!(format_cpulist(&[15, 14, 3, 14]), "3,14-15");
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
        isolated_cpus(Path::new("/sys")).unwrap();
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = online_cpus(Path::new("/nonexistent-sysfs")).unwrap_err();
        assert!(err.to_string().contains("devices/system/cpu/online"), "{err}");
        assert_eq!(isolated_cpus(Path::new("/nonexistent-sysfs")).unwrap(), Vec::<usize>::new());
    }
}
