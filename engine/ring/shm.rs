//! Shared memory: a sealed memfd mapped `MAP_SHARED`.
//!
//! The creator sizes the memfd and seals it against shrinking and growing, so a peer process
//! that holds the descriptor cannot truncate it under us (a truncated mapping raises SIGBUS).
//! [`SharedMemory::open`] refuses a memfd that lacks those seals.

use memmap2::{MmapOptions, MmapRaw};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// A mapped, sealed memfd.
pub struct SharedMemory {
    map: MmapRaw,
    file: File,
}

const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

impl SharedMemory {
    /// A new zero-filled memfd of `len` bytes named `name` (shown in /proc/PID/fd), sealed.
    pub fn create(name: &str, len: usize) -> io::Result<SharedMemory> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "shared memory of 0 bytes"));
        }
        let cname =
            CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name has a NUL byte"))?;
        // SAFETY: cname is a valid NUL-terminated string; the flags are valid memfd flags.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: F_ADD_SEALS on our own memfd with valid seal bits.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS | libc::F_SEAL_SEAL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, len)
    }

    /// Maps a memfd made by [`SharedMemory::create`] (possibly in another process).
    pub fn open(file: File) -> io::Result<SharedMemory> {
        // SAFETY: F_GET_SEALS only reads the descriptor's seal set.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(io::Error::last_os_error());
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memfd is not sealed against shrinking and growing: refusing to map memory a peer can truncate",
            ));
        }
        let len = file.metadata()?.len();
        let len = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd too large"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "memfd is empty"));
        }
        Self::map(file, len)
    }

    fn map(file: File, len: usize) -> io::Result<SharedMemory> {
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        Ok(SharedMemory { map, file })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never: creation refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The memfd, to hand to another process (dup it, or pass it over a unix socket).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory").field("fd", &self.file.as_raw_fd()).field("len", &self.len()).finish()
    }
}
