//! The crossover that a `ferry bench` run's cells call for: the block size from which `auto`
//! should send blocks to the copy engine instead of the resident copy kernel
//! (`RouteTable::copy_engine_from`, `--crossover`), one direction at a time.
//!
//! The run must measure the resident kernel at every size (`--crossover` above the largest
//! size: the `resident` column then is the SMs' path throughout) and the copy engine (`batch`),
//! idle and, with `--load compute`, under the load. The copy engine takes no SM and nothing from
//! the load, so it is chosen wherever it moves about as much as the SMs: at least
//! `1 - SLACK` of their rate, in every condition measured.

/// How much less than the SMs the copy engine may move and still be chosen: about the spread
/// between two runs of one cell on the H200's VM (bench/results/h200.md).
pub const SLACK: f64 = 0.03;

/// One condition's rates (GB/s) of one direction, per block size: the copy engine's and the
/// SMs'.
#[derive(Clone, Copy)]
pub struct Rates<'a> {
    pub engine: &'a [f64],
    pub sms: &'a [f64],
}

/// The smallest of `sizes` from which, at it and at every larger size, the copy engine moves at
/// least `1 - SLACK` of the SMs' rate in every one of `conditions`; `None` where the SMs move
/// more at the largest size (the crossover lies above the sizes measured). A rate that is not a
/// finite number counts against the copy engine.
pub fn crossover(sizes: &[u64], conditions: &[Rates]) -> Option<u64> {
    assert!(conditions.iter().all(|c| c.engine.len() == sizes.len() && c.sms.len() == sizes.len()), "a rate per size");
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| sizes[i]);
    let engine_wins =
        |i: usize| conditions.iter().all(|c| c.engine[i].is_finite() && c.engine[i] >= (1.0 - SLACK) * c.sms[i]);
    // From the largest size down, as long as the copy engine keeps up.
    let mut from = None;
    for &i in order.iter().rev() {
        if !engine_wins(i) {
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
        let idle = Rates { engine: &[15.6, 33.0, 52.3, 54.3, 54.3], sms: &[50.7, 50.9, 51.3, 50.4, 50.7] };
        assert_eq!(crossover(&sizes, &[idle]), Some(64 * K));
        // Within the slack counts as keeping up (49.5 >= 0.97 x 51.0).
        let close = Rates { engine: &[15.6, 33.0, 49.5, 54.3, 54.3], sms: &[50.7, 50.9, 51.0, 50.4, 50.7] };
        assert_eq!(crossover(&sizes, &[close]), Some(64 * K));
        let behind = Rates { engine: &[15.6, 33.0, 49.4, 54.3, 54.3], sms: &[50.7, 50.9, 51.0, 50.4, 50.7] };
        assert_eq!(crossover(&sizes, &[behind]), Some(256 * K));
    }

    #[test]
    fn every_condition_must_agree_and_a_dip_above_moves_the_crossover_up() {
        let sizes = [16 * K, 64 * K, 256 * K];
        let idle = Rates { engine: &[15.0, 52.0, 54.0], sms: &[50.0, 51.0, 51.0] };
        let loaded = Rates { engine: &[17.0, 45.0, 54.0], sms: &[50.0, 50.0, 50.0] };
        assert_eq!(crossover(&sizes, &[idle]), Some(64 * K));
        assert_eq!(crossover(&sizes, &[idle, loaded]), Some(256 * K));
        // Winning at a small size does not count while it loses above it.
        let dip = Rates { engine: &[52.0, 40.0, 54.0], sms: &[50.0, 51.0, 51.0] };
        assert_eq!(crossover(&sizes, &[dip]), Some(256 * K));
    }

    #[test]
    fn the_smallest_size_or_none_and_sizes_in_any_order() {
        let sizes = [64 * K, 4 * K, 16 * K];
        let engine_everywhere = Rates { engine: &[52.0, 50.0, 51.0], sms: &[50.0, 50.0, 50.0] };
        assert_eq!(crossover(&sizes, &[engine_everywhere]), Some(4 * K));
        let sms_at_the_top = Rates { engine: &[40.0, 50.0, 51.0], sms: &[50.0, 50.0, 50.0] };
        assert_eq!(crossover(&sizes, &[sms_at_the_top]), None);
        let unmeasured = Rates { engine: &[f64::NAN, 50.0, 51.0], sms: &[50.0, 50.0, 50.0] };
        assert_eq!(crossover(&sizes, &[unmeasured]), None);
    }
}
