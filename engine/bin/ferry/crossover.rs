//! The crossover that a `ferry bench` run's cells call for: the block size from which `auto`
//! should send blocks to the copy engine instead of the resident copy kernel
//! (`RouteTable::copy_engine_from`, `--crossover`), one direction at a time.
//!
//! The run must measure the resident kernel at every size (`--crossover` above the largest
//! size: the `resident` column then is the SMs' path throughout) and the copy engine (`batch`),
//! idle and, with `--load compute`, under the load. The copy engine takes no SM and little from
//! the load, so it is chosen wherever it moves about as much as the SMs: at least `1 - SLACK` of
//! their rate, in every condition measured. Under the load it is also chosen where the SMs take
//! more of the load's throughput than issue 11 allows ([`LOSS_BUDGET`]) and the copy engine does
//! not, while it still moves at least [`FLOOR`] of the ceiling: there, keeping the load whole
//! is worth the SMs' few percent more.

/// How much less than the SMs the copy engine may move and still be chosen: about the spread
/// between two runs of one cell on the H200's VM (bench/results/h200.md).
pub const SLACK: f64 = 0.03;
/// The share of the load's throughput the copies may take while they run (issue 11).
pub const LOSS_BUDGET: f64 = 0.03;
/// The share of the ceiling the copy engine must move under the load to be chosen for the
/// load's sake (issue 11's floor under load).
pub const FLOOR: f64 = 0.85;

/// One condition's rates (GB/s) of one direction, per block size: the copy engine's and the
/// SMs'; under a load, also what each took from it.
#[derive(Clone, Copy)]
pub struct Rates<'a> {
    pub engine: &'a [f64],
    pub sms: &'a [f64],
    pub cost: Option<Cost<'a>>,
}

/// The share of the load's throughput each path took (0.03: 3 %), per block size, and the
/// direction's ceiling (GB/s).
#[derive(Clone, Copy)]
pub struct Cost<'a> {
    pub engine: &'a [f64],
    pub sms: &'a [f64],
    pub ceiling: f64,
}

impl Rates<'_> {
    /// Whether the copy engine is chosen at size index `i` in this condition. A rate or a loss
    /// that is not a finite number counts against the copy engine.
    fn engine_wins(&self, i: usize) -> bool {
        let engine = self.engine[i];
        if !engine.is_finite() {
            return false;
        }
        let keeps_up = engine >= (1.0 - SLACK) * self.sms[i];
        let spares_the_load = self
            .cost
            .is_some_and(|c| c.sms[i] > LOSS_BUDGET && c.engine[i] <= LOSS_BUDGET && engine >= FLOOR * c.ceiling);
        keeps_up || spares_the_load
    }
}

/// The smallest of `sizes` from which, at it and at every larger size, the copy engine is chosen
/// ([`Rates::engine_wins`]) in every one of `conditions`; `None` where it is not at the largest
/// size (the crossover lies above the sizes measured).
pub fn crossover(sizes: &[u64], conditions: &[Rates]) -> Option<u64> {
    let measured = |c: &Rates| {
        c.engine.len() == sizes.len()
            && c.sms.len() == sizes.len()
            && c.cost.is_none_or(|l| l.engine.len() == sizes.len() && l.sms.len() == sizes.len())
    };
    assert!(conditions.iter().all(measured), "a rate and a loss per size");
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| sizes[i]);
    // From the largest size down, as long as the copy engine is chosen.
    let mut from = None;
    for &i in order.iter().rev() {
        if !conditions.iter().all(|c| c.engine_wins(i)) {
            break;
        }
        from = Some(sizes[i]);
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn the_copy_engine_from_where_it_keeps_up_up_to_the_largest_size() {
        let sizes = [16 * K, 32 * K, 64 * K, 256 * K, 1024 * K];
        // The H200's shape (bench/results/h200.md): the copy engine slow below 64 KiB, level
        // with the SMs from there.
        let idle = Rates { engine: &[15.6, 33.0, 52.3, 54.3, 54.3], sms: &[50.7, 50.9, 51.3, 50.4, 50.7], cost: None };
        assert_eq!(crossover(&sizes, &[idle]), Some(64 * K));
        // Within the slack counts as keeping up (49.5 >= 0.97 x 51.0).
        let close = Rates { engine: &[15.6, 33.0, 49.5, 54.3, 54.3], sms: &[50.7, 50.9, 51.0, 50.4, 50.7], cost: None };
        assert_eq!(crossover(&sizes, &[close]), Some(64 * K));
        let behind =
            Rates { engine: &[15.6, 33.0, 49.4, 54.3, 54.3], sms: &[50.7, 50.9, 51.0, 50.4, 50.7], cost: None };
        assert_eq!(crossover(&sizes, &[behind]), Some(256 * K));
    }

    #[test]
    fn every_condition_must_agree_and_a_dip_above_moves_the_crossover_up() {
        let sizes = [16 * K, 64 * K, 256 * K];
        let idle = Rates { engine: &[15.0, 52.0, 54.0], sms: &[50.0, 51.0, 51.0], cost: None };
        let loaded = Rates { engine: &[17.0, 45.0, 54.0], sms: &[50.0, 50.0, 50.0], cost: None };
        assert_eq!(crossover(&sizes, &[idle]), Some(64 * K));
        assert_eq!(crossover(&sizes, &[idle, loaded]), Some(256 * K));
        // Winning at a small size does not count while it loses above it.
        let dip = Rates { engine: &[52.0, 40.0, 54.0], sms: &[50.0, 51.0, 51.0], cost: None };
        assert_eq!(crossover(&sizes, &[dip]), Some(256 * K));
    }

    #[test]
    fn under_the_load_the_copy_engine_is_chosen_where_the_sms_cost_it_too_much() {
        // The H200's calibration run (bench/results/h200/2026-12-03-s14-calibrate.txt, D2H):
        // under the load the copy engine moved 0.92 of the SMs at 64 KiB, and the SMs took 3.8 %
        // of the load against its 0.1 %.
        let sizes = [32 * K, 64 * K, 128 * K];
        let idle = Rates { engine: &[33.5, 51.9, 52.9], sms: &[51.2, 50.8, 51.3], cost: None };
        let rates = |cost| Rates { engine: &[46.5, 47.3, 53.2], sms: &[51.5, 51.6, 50.9], cost };
        assert_eq!(crossover(&sizes, &[idle, rates(None)]), Some(128 * K));
        let cost = |sms: &'static [f64]| Some(Cost { engine: &[0.001, 0.001, 0.0], sms, ceiling: 55.3 });
        assert_eq!(crossover(&sizes, &[idle, rates(cost(&[0.038, 0.038, 0.039]))]), Some(64 * K));
        // Not where the SMs stay within the budget, ...
        assert_eq!(crossover(&sizes, &[idle, rates(cost(&[0.038, 0.030, 0.039]))]), Some(128 * K));
        // ... nor where the copy engine falls below the floor (0.85 x 55.3 = 47.0), ...
        let slow = Rates { engine: &[46.5, 46.9, 53.2], ..rates(cost(&[0.038, 0.038, 0.039])) };
        assert_eq!(crossover(&sizes, &[idle, slow]), Some(128 * K));
        // ... nor where the copy engine costs the load as much.
        let costly = Cost { engine: &[0.0, 0.04, 0.0], sms: &[0.038, 0.038, 0.039], ceiling: 55.3 };
        assert_eq!(crossover(&sizes, &[idle, rates(Some(costly))]), Some(128 * K));
        // Sparing the load never overrides the idle condition: 32 KiB stays with the SMs.
        let fast_under_load = Rates { engine: &[50.0, 50.0, 53.2], ..rates(cost(&[0.038, 0.038, 0.039])) };
        assert_eq!(crossover(&sizes, &[idle, fast_under_load]), Some(64 * K));
    }

    #[test]
    fn the_smallest_size_or_none_and_sizes_in_any_order() {
        let sizes = [64 * K, 4 * K, 16 * K];
        let engine_everywhere = Rates { engine: &[52.0, 50.0, 51.0], sms: &[50.0, 50.0, 50.0], cost: None };
        assert_eq!(crossover(&sizes, &[engine_everywhere]), Some(4 * K));
        let sms_at_the_top = Rates { engine: &[40.0, 50.0, 51.0], sms: &[50.0, 50.0, 50.0], cost: None };
        assert_eq!(crossover(&sizes, &[sms_at_the_top]), None);
        let unmeasured = Rates { engine: &[f64::NAN, 50.0, 51.0], sms: &[50.0, 50.0, 50.0], cost: None };
        assert_eq!(crossover(&sizes, &[unmeasured]), None);
    }
}
