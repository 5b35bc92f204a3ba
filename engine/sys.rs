//! Thin wrappers over the operating-system calls ferry makes outside its rings and
//! transports: pinning threads, resource limits, probing for shared libraries.

use std::ffi::CString;
use std::io;

/// Pins the calling thread to `core` with `sched_setaffinity`.
pub fn pin_current_thread(core: usize) -> io::Result<()> {
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if core >= bits {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("core {core} is over the cpu_set_t limit of {bits}"),
        ));
    }
    // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: core < bits (checked), so CPU_SET stays inside the set.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one CPU the calling thread is pinned to, if its affinity mask holds exactly one.
pub fn pinned_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is writable and of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: every index is below the set's size.
    let cpus: Vec<usize> = (0..bits).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    (cpus.len() == 1).then(|| cpus[0])
}

/// `RLIMIT_MEMLOCK` (soft limit) in bytes; `None` means unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur))
}

/// Why a shared library cannot be loaded: what `dlerror` said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Whether the shared library `name` can be loaded (it is loaded and unloaded again).
pub fn library_loads(name: &str) -> Result<(), LoadError> {
    let cname = CString::new(name).map_err(|_| LoadError("library name has a NUL byte".to_owned()))?;
    // SAFETY: dlopen with a valid C string; loading runs the library's initialisers, which for
    // the system libraries probed here (libibverbs, libcuda) only set up internal state.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a C string valid until the next dl* call.
        let err = unsafe { libc::dlerror() };
        let text = if err.is_null() {
            "unknown dlopen error".to_owned()
        } else {
            // SAFETY: non-null dlerror result is a NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
        };
        return Err(LoadError(text));
    }
    // SAFETY: `handle` came from dlopen above and is closed once.
    unsafe { libc::dlclose(handle) };
    Ok(())
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessStat {
    /// The state letter (field 3): `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: u8,
    /// When the process started, in clock ticks after boot (field 22). With the pid, it names
    /// one process: a reused pid has a later start time.
    pub start_ticks: u64,
}

impl ProcessStat {
    /// Whether the process has exited (a zombie waiting to be reaped, or dead).
    pub fn exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Reads `/proc/<pid>/stat` (`/proc/self/stat` for `None`).
pub fn process_stat(pid: Option<u32>) -> io::Result<ProcessStat> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    parse_process_stat(&std::fs::read_to_string(path)?)
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// itself hold spaces and parentheses, so the fields are counted after the last `)`.
pub fn parse_process_stat(text: &str) -> io::Result<ProcessStat> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/<pid>/stat: {what}"));
    let rest = &text[text.rfind(')').ok_or_else(|| bad("no ')' after the command name"))? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next().and_then(|s| s.bytes().next()).ok_or_else(|| bad("no state field"))?;
    // Field 3 is the state; field 22 is 19 fields further.
    let start_ticks = fields
        .nth(18)
        .ok_or_else(|| bad("fewer than 22 fields"))?
        .parse()
        .map_err(|_| bad("field 22 (starttime) is not a number"))?;
    Ok(ProcessStat { state, start_ticks })
}

/// Whether a process with this pid exists, by `kill(pid, 0)`: false only when the kernel says
/// there is none (ESRCH). A pid of 0 or above `i32::MAX` names no single process: false.
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that a process with this (positive) pid
    // exists and may be signalled.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_a_strange_command_name_parses() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_process_stat(line).unwrap(), ProcessStat { state: b'S', start_ticks: 987654 });
        assert!(parse_process_stat("1 (x) Z 1 2").is_err());
        assert!(parse_process_stat("no parenthesis").is_err());
    }

    #[test]
    fn this_process_is_alive_and_has_a_start_time() {
        let me = process_stat(None).unwrap();
        assert!(!me.exited());
        assert_eq!(process_stat(Some(std::process::id())).unwrap(), me);
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(0));
        assert!(!process_exists(u32::MAX));
    }
}
