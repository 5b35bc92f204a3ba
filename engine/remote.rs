//! An [`Engine`](crate::Engine) reached through a `ferry serve` daemon ([`Engine::connect`]):
//! each client is one connection to the daemon's control socket, and the calls an engine in
//! this process answers itself (a client, host memory, a queue, GPU memory by CUDA IPC,
//! deregistering) become requests to the daemon. The data path is the same shared memory either
//! way.
//!
//! [`Engine::connect`]: crate::Engine::connect

use crate::config::QueueConfig;
use crate::control::Client;
use crate::desc::RegionId;
use crate::error::Error;
use crate::queue::Queue;
use crate::region::{ClientId, HostBuffer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// The daemon side of a connected engine.
pub(crate) struct Remote {
    socket: PathBuf,
    /// One connection per client, by the client id the daemon gave it.
    clients: Mutex<HashMap<u32, Client>>,
    /// The client whose connection allocated each region (to free it there).
    regions: Mutex<HashMap<RegionId, u32>>,
    /// The first connection, made by `connect`, not yet handed out by `new_client`.
    first: Mutex<Option<ClientId>>,
}

impl Remote {
    /// Connects once (the daemon is there and speaks this protocol, or the error says why).
    pub(crate) fn connect(socket: PathBuf) -> Result<Remote, Error> {
        let client = Client::connect(&socket)?;
        let id = client.id();
        Ok(Remote {
            socket,
            clients: Mutex::new(HashMap::from([(id.0, client)])),
            regions: Mutex::new(HashMap::new()),
            first: Mutex::new(Some(id)),
        })
    }

    /// A client: the first connection the first time, a new connection after.
    pub(crate) fn new_client(&self) -> Result<ClientId, Error> {
        if let Some(id) = lock(&self.first).take() {
            return Ok(id);
        }
        let client = Client::connect(&self.socket)?;
        let id = client.id();
        lock(&self.clients).insert(id.0, client);
        Ok(id)
    }

    /// The client of pool `name` (see [`crate::control::Frame::Join`]): the first connection if
    /// it is still unused, else a new one, joined to the pool; a second call for the same pool
    /// gives the same client (and its connection).
    pub(crate) fn shared_client(&self, name: &str) -> Result<ClientId, Error> {
        let mut clients = lock(&self.clients);
        let (mut connection, was) = match lock(&self.first).take() {
            Some(first) => (clients.remove(&first.0).expect("the first connection is held"), Some(first)),
            None => (Client::connect(&self.socket)?, None),
        };
        let id = match connection.join(name) {
            Ok(id) => id,
            Err(e) => {
                if let Some(first) = was {
                    // Not joined: the first connection stays the first client.
                    clients.insert(first.0, connection);
                    *lock(&self.first) = Some(first);
                }
                return Err(e);
            }
        };
        // A member connection of this pool already here: it serves; this one goes.
        clients.entry(id.0).or_insert(connection);
        Ok(id)
    }

    /// Maps one of `client`'s regions (allocated by another member of its pool).
    pub(crate) fn map_host(&self, client: ClientId, id: RegionId) -> Result<HostBuffer, Error> {
        let buffer = self.with(client, |c| c.map_region(id))?;
        lock(&self.regions).insert(buffer.id(), client.0);
        Ok(buffer)
    }

    fn with<T>(&self, client: ClientId, f: impl FnOnce(&mut Client) -> Result<T, Error>) -> Result<T, Error> {
        let mut clients = lock(&self.clients);
        let connection = clients.get_mut(&client.0).ok_or_else(|| {
            Error::setting("client", client.0, "a client of this engine (Engine::new_client over this connection)")
        })?;
        f(connection)
    }

    pub(crate) fn allocate_host(&self, client: ClientId, len: usize) -> Result<HostBuffer, Error> {
        let buffer = self.with(client, |c| c.alloc_host(len))?;
        lock(&self.regions).insert(buffer.id(), client.0);
        Ok(buffer)
    }

    pub(crate) fn register_memfd(&self, client: ClientId, file: std::fs::File) -> Result<HostBuffer, Error> {
        let buffer = self.with(client, |c| c.register_memfd(file))?;
        lock(&self.regions).insert(buffer.id(), client.0);
        Ok(buffer)
    }

    /// GPU memory of this process, handed to the daemon as its allocation's CUDA IPC handle.
    pub(crate) fn register_gpu(&self, client: ClientId, ptr: u64, len: usize) -> Result<RegionId, Error> {
        let export = crate::cuda_driver::export_ipc(ptr, len as u64).map_err(|reason| Error::GpuRange {
            addr: ptr,
            len: len as u64,
            fault: crate::error::GpuRangeFault::NotExportable(reason),
        })?;
        let id = self.with(client, |c| c.register_gpu(export.handle, export.offset, len as u64))?;
        lock(&self.regions).insert(id, client.0);
        Ok(id)
    }

    pub(crate) fn open_queue(&self, client: ClientId, config: QueueConfig) -> Result<Queue, Error> {
        let plain = QueueConfig {
            submit_capacity: config.submit_capacity,
            complete_capacity: config.complete_capacity,
            ..QueueConfig::default()
        };
        if config.worker != plain.worker || config.gpu != plain.gpu || config.gate_timeout != plain.gate_timeout {
            return Err(Error::NotConnected {
                what: "QueueConfig::worker, gpu and gate_timeout (the daemon's queues take the defaults)",
            });
        }
        self.with(client, |c| c.open_queue(config.submit_capacity, config.complete_capacity))
    }

    pub(crate) fn deregister(&self, id: RegionId) -> Result<(), Error> {
        let owner = lock(&self.regions).get(&id).copied().ok_or(Error::UnknownRegion { id })?;
        self.with(ClientId(owner), |c| c.free(id))?;
        lock(&self.regions).remove(&id);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
