//! Why the GDR transport cannot run, or a NIC call failed: [`GdrError`]. It depends on nothing
//! else of the crate, so that the engine's [`crate::Error`] can carry it.

/// An error of a verbs library call, as the verbs bindings report it.
pub type VerbsError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the GDR transport cannot run, or a NIC call failed. Each message says what is missing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GdrError {
    /// This build has no GDR transport.
    #[error("ferry was built without the `gdr` Cargo feature: build with the default features for GPUDirect RDMA")]
    NotBuilt,
    /// libibverbs cannot be loaded.
    #[error("libibverbs.so.1 not found: install libibverbs1 and ibverbs-providers (Debian/Ubuntu) or rdma-core")]
    NoLibrary,
    /// libibverbs lists no device.
    #[error(
        "no RDMA device: libibverbs found none (is the NIC's driver loaded? for Soft-RoCE: `rdma link add rxe0 type rxe netdev IF`)"
    )]
    NoDevice,
    /// The configured device is not there.
    #[error("RDMA device {name} not found (present: {})", present.join(", "))]
    DeviceNotFound {
        /// The configured name.
        name: String,
        /// The devices libibverbs lists.
        present: Vec<String>,
    },
    /// Every candidate device failed.
    #[error("no usable RDMA device: {}", tried.iter().map(|(name, e)| format!("{name}: {e}")).collect::<Vec<_>>().join("; "))]
    NoUsableDevice {
        /// Each device tried, with why it failed.
        tried: Vec<(String, GdrError)>,
    },
    /// A verbs call failed.
    #[error("{call}{context}: {source}")]
    Verbs {
        /// The verbs function (`ibv_create_qp`).
        call: &'static str,
        /// What it was called with, for the message (` (port 1)`), or empty.
        context: String,
        /// The bindings' error.
        #[source]
        source: VerbsError,
    },
    /// The port is not active.
    #[error("port {port} is not active ({state}): bring the link up")]
    PortInactive {
        /// Port number.
        port: u8,
        /// Its state.
        state: String,
    },
    /// The port has no usable GID.
    #[error("port {port} has no GID (is the netdev up with an address?)")]
    NoGid {
        /// Port number.
        port: u8,
    },
    /// The GID index does not fit the verbs field.
    #[error("GID index {index} above 255")]
    GidIndex {
        /// The index.
        index: u32,
    },
    /// The loopback self-test of a newly opened NIC failed.
    #[error("{device}: loopback self-test failed: {fault}")]
    SelfTest {
        /// The device.
        device: String,
        /// What went wrong.
        fault: SelfTestFault,
    },
    /// GPU memory could be registered with the NIC neither as a dma-buf nor by its device
    /// pointer.
    #[error("as a dma-buf: {dmabuf}; by device pointer (needs nvidia-peermem): {peermem}")]
    GpuMemory {
        /// Why the dma-buf export or its registration failed.
        dmabuf: VerbsError,
        /// Why the registration by device pointer failed.
        #[source]
        peermem: Box<GdrError>,
    },
    /// The fallback transport behind GDR failed to start.
    #[error("starting the fallback transport: {0}")]
    Fallback(#[source] VerbsError),
}

/// What went wrong in a NIC's loopback self-test.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SelfTestFault {
    /// Setting it up failed.
    #[error("{0}")]
    Setup(#[source] Box<GdrError>),
    /// The transport did not take both writes.
    #[error("the transport refused two operations")]
    Refused,
    /// A write completed with an error.
    #[error("a write completed with status code {status} (detail {detail:#x})")]
    Failed {
        /// The status code.
        status: u32,
        /// Its detail.
        detail: u32,
    },
    /// No completion came.
    #[error("no completion within 2 s")]
    NoCompletion,
    /// The bytes arrived wrong.
    #[error("the bytes written do not match")]
    WrongBytes,
}

impl GdrError {
    /// A failed verbs call `call`, with `context` for the message.
    #[cfg(feature = "gdr")]
    pub(crate) fn verbs(
        call: &'static str,
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> GdrError {
        GdrError::Verbs { call, context: context.into(), source: Box::new(source) }
    }
}
