//! Pinning threads to cores.

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
