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
