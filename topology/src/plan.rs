//! The plan: for each GPU, the nearest RDMA NIC and the cores for its workers.
//!
//! NIC: the nearest by [`Relation`], ties broken by the NIC sitting on the GPU's NUMA node, then
//! by the fewest GPUs already given that NIC, then by name. A NIC with no active port is still a
//! candidate but only after every NIC with one.
//!
//! Cores: the highest-numbered free CPUs from, in order of preference, the isolated CPUs local
//! to the GPU, the CPUs local to the GPU, then any online CPU; never CPU 0 or a CPU in
//! [`PlanConfig::avoid`] unless nothing else is left (a note says so). Explicit configuration
//! ([`PlanConfig::nic`], [`PlanConfig::cores`]) always wins.

use crate::machine::Machine;
use crate::relation::Relation;
use crate::TopologyError;
use std::collections::BTreeSet;

/// Choices the caller makes; the plan fills in the rest.
#[derive(Clone, Debug, Default)]
pub struct PlanConfig {
    /// Worker threads per GPU (0 is taken as 1).
    pub workers_per_gpu: usize,
    /// CPUs not to use unless nothing else is left (the caller's own core, for example).
    pub avoid: Vec<usize>,
    /// Use this RDMA device for every GPU.
    pub nic: Option<String>,
    /// Use these cores, in order, for the workers (of all GPUs, `workers_per_gpu` each).
    pub cores: Option<Vec<usize>>,
}

/// The NIC chosen for a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicChoice {
    /// RDMA device name.
    pub name: String,
    /// Its relation to the GPU (`None`: a software device, no PCI path).
    pub relation: Option<Relation>,
    /// Why it was chosen.
    pub why: String,
}

/// The plan for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPlan {
    /// PCI bus id.
    pub gpu: String,
    /// NUMA node, if known.
    pub numa_node: Option<u32>,
    /// The NIC, or `None` when the machine has no RDMA device.
    pub nic: Option<NicChoice>,
    /// Worker cores.
    pub cores: Vec<usize>,
    /// Anything the reader should know (fallbacks taken).
    pub notes: Vec<String>,
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    /// One entry per GPU, in the machine's GPU order.
    pub gpus: Vec<GpuPlan>,
    /// Machine-wide notes (no RDMA NIC, no GPU, ...).
    pub notes: Vec<String>,
}

/// Picks `n` free cores, preferring `tiers` in order, highest-numbered first within a tier,
/// never CPU 0 or an avoided CPU while anything else is left.
pub fn pick_cores(
    machine: &Machine,
    tiers: &[&[usize]],
    n: usize,
    avoid: &[usize],
    taken: &mut BTreeSet<usize>,
    notes: &mut Vec<String>,
) -> Vec<usize> {
    /// How far a pass may go: the preferred tiers are strict; then avoided CPUs, then CPU 0.
    #[derive(Clone, Copy, PartialEq)]
    enum Rule {
        Strict,
        AllowAvoided,
        AllowZero,
    }
    let mut passes: Vec<(&[usize], Rule)> = tiers.iter().map(|t| (*t, Rule::Strict)).collect();
    passes.push((&machine.online, Rule::AllowAvoided));
    passes.push((&machine.online, Rule::AllowZero));
    let mut chosen = Vec::new();
    for (tier, rule) in passes {
        for &cpu in tier.iter().rev() {
            if chosen.len() == n {
                return chosen;
            }
            let allowed = match rule {
                Rule::Strict => cpu != 0 && !avoid.contains(&cpu),
                Rule::AllowAvoided => cpu != 0,
                Rule::AllowZero => true,
            };
            if machine.online.contains(&cpu) && allowed && !taken.contains(&cpu) {
                match rule {
                    Rule::Strict => {}
                    Rule::AllowAvoided => {
                        notes.push(format!("not enough other free CPUs: worker on avoided CPU {cpu}"))
                    }
                    Rule::AllowZero => notes.push("not enough other free CPUs: worker on CPU 0".to_owned()),
                }
                taken.insert(cpu);
                chosen.push(cpu);
            }
        }
    }
    if chosen.len() < n {
        notes.push(format!("only {} free CPUs for {n} workers", chosen.len()));
    }
    chosen
}

/// Builds the plan. Fails only when the configuration names a NIC the machine lacks.
pub fn plan(machine: &Machine, config: &PlanConfig) -> Result<Plan, TopologyError> {
    let per_gpu = config.workers_per_gpu.max(1);
    let mut plan = Plan::default();
    if machine.gpus.is_empty() {
        plan.notes.push("no NVIDIA GPU: nothing to plan".into());
    }
    if machine.nics.is_empty() {
        plan.notes.push("no RDMA NIC: GPUDirect RDMA is unavailable on this machine".into());
    }
    if let Some(name) = &config.nic {
        if !machine.nics.iter().any(|n| &n.rdma.name == name) {
            let known: Vec<String> = machine.nics.iter().map(|n| n.rdma.name.clone()).collect();
            return Err(TopologyError::NicNotFound { name: name.clone(), known });
        }
    }
    let mut assigned = vec![0usize; machine.nics.len()];
    let mut taken = BTreeSet::new();
    let mut explicit = config.cores.clone().map(|c| c.into_iter());
    for (g, gpu) in machine.gpus.iter().enumerate() {
        let mut notes = Vec::new();
        let nic = match &config.nic {
            Some(name) => {
                let i = machine.nics.iter().position(|n| &n.rdma.name == name).expect("checked above");
                assigned[i] += 1;
                Some(NicChoice { name: name.clone(), relation: machine.relation(g, i), why: "configured".into() })
            }
            None => (0..machine.nics.len())
                .min_by_key(|&i| {
                    let nic = &machine.nics[i];
                    let inactive = !nic.rdma.ports.iter().any(|p| p.is_active());
                    let relation = machine.relation(g, i).unwrap_or(Relation::Sys);
                    let other_node =
                        nic.pci.as_ref().and_then(|p| p.numa_node) != gpu.numa_node || gpu.numa_node.is_none();
                    (inactive, relation, other_node, assigned[i], nic.rdma.name.clone())
                })
                .map(|i| {
                    assigned[i] += 1;
                    let relation = machine.relation(g, i);
                    if !machine.nics[i].rdma.ports.iter().any(|p| p.is_active()) {
                        notes.push(format!("{} has no active port", machine.nics[i].rdma.name));
                    }
                    let why = match relation {
                        Some(_) => "nearest RDMA NIC".to_owned(),
                        None => "software RDMA device: no PCI path to compare".to_owned(),
                    };
                    NicChoice { name: machine.nics[i].rdma.name.clone(), relation, why }
                }),
        };
        let cores = match explicit.as_mut() {
            Some(list) => {
                let cores: Vec<usize> = list.by_ref().take(per_gpu).collect();
                if cores.len() < per_gpu {
                    notes.push(format!("configured cores ran out: {} of {per_gpu} workers placed", cores.len()));
                }
                taken.extend(cores.iter().copied());
                cores
            }
            None => {
                let local = machine.local_cpus(gpu);
                let isolated_local: Vec<usize> =
                    local.iter().copied().filter(|c| machine.isolated.contains(c)).collect();
                pick_cores(machine, &[&isolated_local, &local], per_gpu, &config.avoid, &mut taken, &mut notes)
            }
        };
        plan.gpus.push(GpuPlan { gpu: gpu.address.clone(), numa_node: gpu.numa_node, nic, cores, notes });
    }
    Ok(plan)
}

/// Cores for `n` workers that serve no particular GPU: isolated CPUs first, then any.
pub fn host_cores(machine: &Machine, n: usize, avoid: &[usize]) -> (Vec<usize>, Vec<String>) {
    let mut notes = Vec::new();
    let cores = pick_cores(machine, &[&machine.isolated, &machine.online], n, avoid, &mut BTreeSet::new(), &mut notes);
    (cores, notes)
}
