//! Reports about the machine: `ferry topo` (GPU x NIC matrix and the plan) and `ferry doctor`
//! (what GPU transports need, each line OK / WARN / FAIL with the fix).

pub mod doctor;
pub mod topo;
