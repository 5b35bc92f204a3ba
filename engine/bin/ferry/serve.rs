//! `ferry serve`: one engine shared by client processes over a Unix control socket, configured
//! by a TOML file and flags (see the README's "Many processes" section, also for what is not
//! there yet).
//!
//! The socket is created with mode 0600 and each connection's peer credentials are checked:
//! the daemon's own user, or a uid named with `--allow-uid`. A connection gets its own client
//! id; its queues (opened with `close_if_client_dies`) and its host memory come back as memfds
//! (`ferry::control`); on the CUDA transport its GPU memory comes in as CUDA IPC handles, which
//! the daemon maps until the region is freed. When the connection ends, its regions are deregistered and freed (after
//! the copies using them are over), and its queues are closed as soon as no live process holds
//! them. Connections that join a pool (`Frame::Join`) are one client: they share its regions,
//! which are freed when the last of them ends. `ferry stat` reads every connection's queue
//! counters (`Frame::Stat`). SIGTERM or SIGINT stops the daemon: no new connection is taken, the engine shuts down
//! (started copies complete, queued ones are cancelled) and the socket file is removed.

use ferry::control::{receive, send, Frame, StatRow, MAX_STAT_ROWS};
use ferry::{ClientId, Engine, EngineConfig, HostBuffer, QueueConfig, RegionId, TransportKind};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const USAGE: &str =
    "usage: ferry serve [--config FILE] [--socket PATH] [--transport host|null|cuda] [--device N] [--all-gpus] [--workers N] [--unpinned]
                   [--allow-uid UID]... [--quiet] [--print-config]";

/// Set by the SIGTERM/SIGINT handler.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // R1: Release; pairs with A1 in the accept loop. A store is async-signal-safe.
    STOP.store(true, Ordering::Release);
}

/// The daemon's configuration: a TOML file (`--config`), every key optional but `socket`,
/// unknown keys an error; flags override it. `--print-config` prints the effective one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The control socket's path. Created with mode 0600; a stale socket there is replaced,
    /// anything else is an error.
    #[serde(default)]
    pub socket: PathBuf,
    /// Uids allowed to connect besides the daemon's own.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// "info": connections refused or ended, start and stop; "error": failures only.
    #[serde(default)]
    pub log: LogLevel,
    /// The engine the clients share.
    #[serde(default)]
    pub engine: EngineSection,
    /// What one client (connection) may hold at once.
    #[serde(default)]
    pub limits: Limits,
}

/// `[limits]` of [`ServeConfig`]: a request over a limit is refused with a text naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections served at once (each has a thread): one more is refused with a text.
    pub connections: usize,
    /// Queues one client holds open at once (closed ones do not count).
    pub queues_per_client: usize,
    /// Memory regions (host, and GPU memory registered by CUDA IPC) one client holds at once.
    pub regions_per_client: usize,
    /// Bytes of host memory (pinned for a GPU transport) one client holds at once.
    pub host_bytes_per_client: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: 256, queues_per_client: 64, regions_per_client: 1024, host_bytes_per_client: 16 << 30 }
    }
}

/// `[engine]` of [`ServeConfig`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// "host" (CPU copies), "null" (no data moves) or "cuda" (the CUDA driver's copies and
    /// ferry's copy kernel on GPU `device`: clients register GPU memory by CUDA IPC; host memory
    /// is pinned; no GDR through the daemon yet).
    pub transport: Transport,
    /// The CUDA device ordinal ("cuda" only).
    pub device: u32,
    /// "cuda" only: every GPU of the host in one engine (`device` unused), each with `workers`
    /// workers of its own; clients' GPU memory on any of them.
    pub all_gpus: bool,
    /// Worker threads.
    pub workers: usize,
    /// Pin each worker to a core of the topology plan (false: unpinned).
    pub pinned: bool,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection { transport: Transport::Host, device: 0, all_gpus: false, workers: 1, pinned: true }
    }
}

/// `engine.transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// CPU copies.
    Host,
    /// No data moves.
    Null,
    /// The CUDA transport (without GDR).
    Cuda,
}

/// `log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Also connections refused or ended, start and stop.
    #[default]
    Info,
}

/// What `ferry serve` was asked: the configuration, and whether only to print it.
#[derive(Debug)]
pub struct Options {
    config: ServeConfig,
    print_config: bool,
}

pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut config = ServeConfig {
        socket: PathBuf::new(),
        allow_uids: Vec::new(),
        log: LogLevel::Info,
        engine: EngineSection::default(),
        limits: Limits::default(),
    };
    let mut print_config = false;
    // The file first, wherever it is among the flags, so that the flags override it.
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let path = args.get(i + 1).ok_or("--config needs a value")?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        config = toml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--config" => {
                value()?;
            }
            "--socket" => config.socket = PathBuf::from(value()?),
            "--transport" => {
                config.engine.transport = match value()?.as_str() {
                    "host" => Transport::Host,
                    "null" => Transport::Null,
                    "cuda" => Transport::Cuda,
                    other => return Err(format!("--transport {other:?}: host, null or cuda")),
                }
            }
            "--device" => config.engine.device = value()?.parse().map_err(|_| "--device: a CUDA ordinal".to_owned())?,
            "--all-gpus" => config.engine.all_gpus = true,
            "--workers" => config.engine.workers = value()?.parse().map_err(|_| "--workers: a number".to_owned())?,
            "--allow-uid" => config.allow_uids.push(value()?.parse().map_err(|_| "--allow-uid: a uid".to_owned())?),
            "--unpinned" => config.engine.pinned = false,
            "--quiet" => config.log = LogLevel::Error,
            "--print-config" => print_config = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if config.socket.as_os_str().is_empty() {
        return Err("--socket PATH is needed (or `socket` in the --config file)".into());
    }
    Ok(Options { config, print_config })
}

/// The uid of the process at the other end of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    // SAFETY: an all-zero ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket, a writable ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

pub fn serve(options: &Options) -> Result<(), String> {
    let o = &options.config;
    if options.print_config {
        print!("{}", toml::to_string(o).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let transport = match o.engine.transport {
        Transport::Host => TransportKind::Host,
        Transport::Null => TransportKind::Null,
        Transport::Cuda => TransportKind::Gpu(ferry::GpuConfig {
            device: o.engine.device,
            devices: if o.engine.all_gpus { ferry::GpuSet::All } else { ferry::GpuSet::One },
            gdr: ferry::GdrConfig { use_gdr: ferry::UseGdr::Off, ..ferry::GdrConfig::default() },
            ..ferry::GpuConfig::default()
        }),
    };
    let config = EngineConfig {
        transport,
        workers: o.engine.workers,
        cores: if o.engine.pinned { ferry::CorePlacement::Auto } else { ferry::CorePlacement::Unpinned },
        ..EngineConfig::default()
    };
    let engine = Arc::new(Engine::start(config).map_err(|e| format!("starting the engine: {e}"))?);
    if o.socket.exists() {
        // A socket file left by a daemon that died: only a socket is removed, never a file.
        let kind = std::fs::symlink_metadata(&o.socket).map_err(|e| e.to_string())?.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !kind.is_socket() || UnixStream::connect(&o.socket).is_ok() {
            return Err(format!("{} exists and is not a stale socket", o.socket.display()));
        }
        std::fs::remove_file(&o.socket).map_err(|e| format!("removing the stale {}: {e}", o.socket.display()))?;
    }
    let listener = UnixListener::bind(&o.socket).map_err(|e| format!("binding {}: {e}", o.socket.display()))?;
    std::fs::set_permissions(&o.socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let log = |text: String| {
        if o.log == LogLevel::Info {
            eprintln!("ferry serve: {text}");
        }
    };
    log(format!(
        "listening on {} (transport {}, {} worker(s))",
        o.socket.display(),
        engine.transport_name(),
        o.engine.workers
    ));
    let mut sessions: Vec<(std::thread::JoinHandle<()>, UnixStream)> = Vec::new();
    let registry = Registry::default();
    // A1: Acquire; pairs with R1 in on_signal.
    while !STOP.load(Ordering::Acquire) {
        // Sessions whose client hung up are over: their room is free.
        sessions.retain(|(s, _)| !s.is_finished());
        match listener.accept() {
            Ok((stream, _)) => {
                let uid = match peer_uid(&stream) {
                    Ok(uid) => uid,
                    Err(e) => {
                        log(format!("refused a connection: no peer credentials ({e})"));
                        continue;
                    }
                };
                if uid != me && !o.allow_uids.contains(&uid) {
                    log(format!("refused a connection from uid {uid} (allowed: {me} and {:?})", o.allow_uids));
                    let _ = send(&stream, &Frame::Failed { text: format!("uid {uid} is not allowed") }, None);
                    continue;
                }
                if sessions.len() >= o.limits.connections {
                    log(format!("refused a connection: {} served already (limits.connections)", sessions.len()));
                    let text = format!("over limits.connections ({}): try again later", o.limits.connections);
                    let _ = send(&stream, &Frame::Failed { text }, None);
                    continue;
                }
                let Ok(ours) = stream.try_clone() else {
                    log("refused a connection: cannot duplicate its socket".into());
                    continue;
                };
                let (engine, registry) = (engine.clone(), registry.clone());
                let (quiet, limits) = (o.log == LogLevel::Error, o.limits);
                let run = move || session(&engine, &registry, stream, quiet, limits);
                sessions.push((std::thread::spawn(run), ours));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => log(format!("accept: {e}")),
        }
    }
    log(format!("stopping: ending {} connection(s)", sessions.len()));
    let _ = std::fs::remove_file(&o.socket);
    // Each session sees its socket end, frees what its client had and returns.
    for (thread, stream) in sessions {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = thread.join();
    }
    // The sessions held the only other references: the engine's shutdown completes started
    // copies and cancels the rest.
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown(),
        Err(_) => return Err("a session still holds the engine".into()),
    }
    log("stopped".into());
    Ok(())
}

/// Every connection's queues (their memfds) by (client, connection), for `ferry stat`; and
/// the pools that connections joined.
#[derive(Clone, Default)]
struct Registry(Arc<Mutex<Queues>>, Arc<Mutex<HashMap<String, Pool>>>);

/// Queue memfds by (client id, connection).
type Queues = HashMap<(u32, u64), Vec<File>>;

/// What a client holds: its host regions, and its GPU regions (CUDA IPC mappings, closed when
/// deregistered). A pool's is shared by its members' connections.
struct Owner {
    client: ClientId,
    regions: HashMap<RegionId, HostBuffer>,
    gpu: HashSet<RegionId>,
}

impl Owner {
    fn new(client: ClientId) -> Owner {
        Owner { client, regions: HashMap::new(), gpu: HashSet::new() }
    }

    /// Whether it holds no region.
    fn is_empty(&self) -> bool {
        self.regions.is_empty() && self.gpu.is_empty()
    }

    /// Regions of either kind.
    fn count(&self) -> usize {
        self.regions.len() + self.gpu.len()
    }
}

/// A pool: its owner and how many connections are its members.
struct Pool {
    owner: Arc<Mutex<Owner>>,
    members: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        lock(&self.0)
    }

    /// How many of connection `key`'s queues are still open (closed ones are dropped here).
    fn open_queues(&self, key: (u32, u64)) -> usize {
        let mut queues = self.lock();
        let Some(mine) = queues.get_mut(&key) else { return 0 };
        mine.retain(|file| !ferry::Queue::closed_by_client(file).unwrap_or(true));
        mine.len()
    }

    /// Makes a connection a member of pool `name`: its owner, new if the pool is.
    fn join(&self, engine: &Engine, name: &str) -> Result<Arc<Mutex<Owner>>, String> {
        ferry::control::check_pool_name(name).map_err(|e| e.to_string())?;
        let mut pools = lock(&self.1);
        let pool = pools
            .entry(name.to_owned())
            .or_insert_with(|| Pool { owner: Arc::new(Mutex::new(Owner::new(engine.new_client()))), members: 0 });
        pool.members += 1;
        Ok(pool.owner.clone())
    }

    /// A member of pool `name` left: the pool's regions, when it was the last one.
    fn leave(&self, name: &str) -> Option<Arc<Mutex<Owner>>> {
        let mut pools = lock(&self.1);
        let pool = pools.get_mut(name)?;
        pool.members -= 1;
        if pool.members > 0 {
            return None;
        }
        pools.remove(name).map(|p| p.owner)
    }

    /// One row per client with queues (their open queues summed), then one per worker.
    fn rows(&self, engine: &Engine) -> Vec<StatRow> {
        let mut rows: Vec<StatRow> = Vec::new();
        let mut by_client: HashMap<u32, Vec<ferry::QueueStats>> = HashMap::new();
        for (&(id, _), files) in self.lock().iter() {
            by_client.entry(id).or_default().extend(files.iter().filter_map(|f| ferry::Queue::stats_of(f).ok()));
        }
        let mut clients: Vec<(u32, Vec<ferry::QueueStats>)> = by_client.into_iter().collect();
        clients.sort_by_key(|(id, _)| *id);
        for (id, queues) in clients {
            let open: Vec<_> = queues.iter().filter(|q| q.open).collect();
            let mut values = [0u64; 4];
            for q in &open {
                for (v, x) in values.iter_mut().zip([q.completed, q.bytes, q.failed, q.depth]) {
                    *v = v.saturating_add(x);
                }
            }
            rows.push(StatRow { kind: StatRow::CLIENT, id, queues: open.len() as u32, values });
        }
        // Workers last, so that a truncation (more clients than a frame holds) keeps them.
        let workers: Vec<StatRow> = engine
            .stats()
            .iter()
            .enumerate()
            .map(|(i, w)| StatRow {
                kind: StatRow::WORKER,
                id: i as u32,
                queues: w.queues as u32,
                values: [w.descriptors, w.transport_completions, w.iterations, w.idle_iterations],
            })
            .collect();
        rows.truncate(MAX_STAT_ROWS.saturating_sub(workers.len()));
        rows.extend(workers);
        rows
    }
}

/// One client connection, until it hangs up: answers its requests, then frees what it had.
fn session(engine: &Engine, registry: &Registry, stream: UnixStream, quiet: bool, limits: Limits) {
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Relaxed: a unique-id counter.
    let me = SESSIONS.fetch_add(1, Ordering::Relaxed);
    let log = |text: String| {
        if !quiet {
            eprintln!("ferry serve: {text}");
        }
    };
    let mut client = engine.new_client();
    let mut owner = Arc::new(Mutex::new(Owner::new(client)));
    let mut pool: Option<String> = None;
    let mut hello = false;
    loop {
        let (frame, fd) = match receive(&stream) {
            Ok(Some(got)) => got,
            Ok(None) => break,
            Err(e) => {
                // A malformed frame or a broken connection: this client is done.
                log(format!("client {}: {e}; disconnecting it", client.0));
                let _ = send(&stream, &Frame::Failed { text: e.to_string() }, None);
                break;
            }
        };
        let answer = match frame {
            Frame::Hello { abi } if abi == ferry::queue::QUEUE_ABI_VERSION => {
                hello = true;
                Ok((Frame::Welcome { client: client.0 }, None))
            }
            Frame::Hello { abi } => {
                Err(format!("queue ABI {abi} is not this daemon's {}", ferry::queue::QUEUE_ABI_VERSION))
            }
            _ if !hello => Err("say hello first".to_owned()),
            Frame::Join { name }
                if pool.is_none()
                    && registry.lock().get(&(client.0, me)).is_none_or(Vec::is_empty)
                    && lock(&owner).is_empty() =>
            {
                registry.join(engine, &name).map(|joined| {
                    owner = joined;
                    client = lock(&owner).client;
                    pool = Some(name);
                    (Frame::Welcome { client: client.0 }, None)
                })
            }
            Frame::Join { .. } => Err("join a pool first, before allocating or opening queues, and once".to_owned()),
            Frame::MapRegion { region } => match lock(&owner).regions.get(&RegionId(region)) {
                None => Err(format!("region {region:#x} is not this client's")),
                Some(buffer) => {
                    Ok((Frame::HostAllocated { region, len: buffer.len() as u64 }, Some(buffer.file().as_raw_fd())))
                }
            },
            Frame::OpenQueue { .. } if registry.open_queues((client.0, me)) >= limits.queues_per_client => {
                Err(format!("over limits.queues_per_client ({}): close a queue first", limits.queues_per_client))
            }
            Frame::OpenQueue { submit_capacity, complete_capacity } => {
                open_queue(engine, client, submit_capacity, complete_capacity).map(|(id, file)| {
                    let fd = file.as_raw_fd();
                    registry.lock().entry((client.0, me)).or_default().push(file);
                    (Frame::QueueOpened { queue: id }, Some(fd))
                })
            }
            Frame::AllocHost { len } | Frame::RegisterMemfd { len } => {
                let given = matches!(frame, Frame::RegisterMemfd { .. });
                let mut owner = lock(&owner);
                let held = owner.regions.values().map(|b| b.len() as u64).sum::<u64>();
                if owner.count() >= limits.regions_per_client {
                    Err(format!("over limits.regions_per_client ({}): free a region first", limits.regions_per_client))
                } else if held.saturating_add(len) > limits.host_bytes_per_client {
                    Err(format!(
                        "{len} more bytes would be over limits.host_bytes_per_client ({})",
                        limits.host_bytes_per_client
                    ))
                } else {
                    let buffer = match (given, fd) {
                        (false, _) => engine.allocate_host(client, len as usize).map_err(|e| e.to_string()),
                        (true, None) => Err("RegisterMemfd without a memfd attached".to_owned()),
                        (true, Some(fd)) => {
                            engine.register_memfd(client, File::from(fd)).map_err(|e| e.to_string()).and_then(|b| {
                                if b.len() as u64 == len {
                                    Ok(b)
                                } else {
                                    let _ = engine.deregister(b.id());
                                    Err(format!("the memfd holds {} bytes, the request says {len}", b.len()))
                                }
                            })
                        }
                    };
                    buffer.map(|buffer| {
                        let (region, memfd) = (buffer.id(), buffer.file().as_raw_fd());
                        owner.regions.insert(region, buffer);
                        // The client has a memfd it gave; one allocated here goes to it.
                        (Frame::HostAllocated { region: region.0, len }, (!given).then_some(memfd))
                    })
                }
            }
            Frame::RegisterGpu { handle, offset, len } => {
                let mut owner = lock(&owner);
                if owner.count() >= limits.regions_per_client {
                    Err(format!("over limits.regions_per_client ({}): free a region first", limits.regions_per_client))
                } else {
                    usize::try_from(len)
                        .map_err(|_| format!("{len} bytes"))
                        .and_then(|n| engine.register_gpu_ipc(client, &handle, offset, n).map_err(|e| e.to_string()))
                        .map(|region| {
                            owner.gpu.insert(region);
                            (Frame::GpuRegistered { region: region.0 }, None)
                        })
                }
            }
            Frame::Free { region } => {
                let (mut owner, id) = (lock(&owner), RegionId(region));
                if !owner.regions.contains_key(&id) && !owner.gpu.contains(&id) {
                    Err(format!("region {region:#x} is not this client's"))
                } else {
                    engine.deregister(id).map_err(|e| e.to_string()).map(|()| {
                        owner.regions.remove(&id);
                        owner.gpu.remove(&id);
                        (Frame::Done, None)
                    })
                }
            }
            Frame::Stat => Ok((Frame::Stats { rows: registry.rows(engine) }, None)),
            other => Err(format!("{other:?} is not a request")),
        };
        // The memfd sent with an answer stays open meanwhile: the owner or the registry holds it.
        let sent = match &answer {
            Ok((frame, fd)) => send(&stream, frame, *fd),
            Err(text) => send(&stream, &Frame::Failed { text: text.clone() }, None),
        };
        if sent.is_err() {
            break;
        }
    }
    // Queues: closed by their worker once no live process holds them (close_if_client_dies);
    // one released and never attached is taken here and closed.
    let queues = registry.lock().remove(&(client.0, me)).unwrap_or_default();
    for file in queues {
        if let Ok(queue) = ferry::Queue::attach(file) {
            queue.close();
        }
    }
    // Regions: deregistered once the copies using them are over; a pool's when its last member
    // is gone.
    let owner = match &pool {
        None => Some(owner),
        Some(name) => registry.leave(name),
    };
    let Some(owner) = owner else {
        log(format!("client {} (a pool member) gone; its queues are freed, the pool's regions stay", client.0));
        return;
    };
    let (regions, gpu) = {
        let mut owner = lock(&owner);
        (std::mem::take(&mut owner.regions), std::mem::take(&mut owner.gpu))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // The host buffers (this side's mappings) are dropped after their regions are deregistered.
    for id in regions.keys().chain(gpu.iter()).copied() {
        while let Err(ferry::Error::RegionBusy { .. }) = engine.deregister(id) {
            if Instant::now() > deadline {
                log(format!("client {}: region {id} still busy after 10 s; left registered", client.0));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    log(format!("client {} gone; its queues and regions are freed", client.0));
}

fn open_queue(engine: &Engine, client: ClientId, submit: u64, complete: u64) -> Result<(u32, File), String> {
    let config = QueueConfig { close_if_client_dies: true, ..QueueConfig::default().with_capacities(submit, complete) };
    let queue = engine.open_queue(client, config).map_err(|e| e.to_string())?;
    let id = queue.id().0;
    queue.hand_off().map(|file| (id, file)).map_err(|e| e.to_string())
}
