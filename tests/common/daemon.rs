//! A `ferry serve` child process for the tests that need a daemon.

use super::TIMEOUT;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `ferry` binary: `FERRY_BIN` where set (the GPU machine runs binaries built elsewhere),
/// else this build's.
pub fn ferry_bin() -> PathBuf {
    std::env::var_os("FERRY_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferry")), PathBuf::from)
}

/// A running `ferry serve`, its socket path, and its stderr lines as they come.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// A host-transport daemon, unpinned.
    pub fn start(name: &str) -> Daemon {
        let socket = std::env::temp_dir().join(format!("ferry-serve-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        Daemon::start_at(socket)
    }

    /// A daemon with these `ferry serve` flags after `--socket` (the transport and the rest).
    pub fn start_with(name: &str, flags: &[&str]) -> Result<Daemon, String> {
        let socket = std::env::temp_dir().join(format!("ferry-serve-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        Daemon::spawn(socket, flags)
    }

    /// A daemon on `socket` (a stale socket file there is the daemon's to replace).
    pub fn start_at(socket: PathBuf) -> Daemon {
        Daemon::spawn(socket, &["--transport", "host", "--unpinned"]).unwrap()
    }

    /// Starts `ferry serve` and waits for it to listen; `Err` with its stderr if it exits first.
    fn spawn(socket: PathBuf, flags: &[&str]) -> Result<Daemon, String> {
        let mut child = Command::new(ferry_bin())
            .args(["serve", "--socket", socket.to_str().unwrap()])
            .args(flags)
            .stderr(Stdio::piped())
            .spawn()
            .expect("ferry serve starts");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon { child, socket, lines };
        let deadline = Instant::now() + TIMEOUT;
        let mut said = Vec::new();
        loop {
            match daemon.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.contains("listening on") => return Ok(daemon),
                Ok(line) => said.push(line),
                Err(_) => {}
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                said.extend(daemon.lines.try_iter());
                return Err(format!("ferry serve exited with {status}: {}", said.join(" / ")));
            }
            assert!(Instant::now() < deadline, "the daemon never said it listens: {said:?}");
        }
    }

    /// Waits for a stderr line containing `text`.
    pub fn expect_line(&self, text: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("the daemon never said {text:?}"),
            }
        }
    }

    pub fn stop(mut self) {
        // SAFETY: signals our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop within 5 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "the daemon exited with {status}");
        assert!(!self.socket.exists(), "the socket file was left behind");
    }
}
