//! `ferry stat`: the counters of a running `ferry serve`, per client and per worker, with the
//! rates since the last look, refreshed every `--interval` (the screen redrawn on a terminal;
//! successive tables otherwise).

use ferry::control::StatRow;
use ferry::Client;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Rows by (kind, id): one look at the daemon's counters.
type Snapshot = HashMap<(u32, u32), StatRow>;

pub const USAGE: &str = "usage: ferry stat --socket PATH [--interval SECONDS] [--count N]";

struct Options {
    socket: PathBuf,
    interval: Duration,
    count: Option<u64>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options { socket: PathBuf::new(), interval: Duration::from_secs(1), count: None };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => o.socket = PathBuf::from(value()?),
            "--interval" => {
                let seconds: f64 = value()?.parse().map_err(|_| "--interval: seconds, such as 1 or 0.5".to_owned())?;
                if !(seconds > 0.0 && seconds < 86_400.0) {
                    return Err("--interval: more than 0 and less than a day".into());
                }
                o.interval = Duration::from_secs_f64(seconds);
            }
            "--count" => o.count = Some(value()?.parse().map_err(|_| "--count: a number of tables".to_owned())?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.socket.as_os_str().is_empty() {
        return Err("--socket PATH is needed (the daemon's control socket)".into());
    }
    Ok(o)
}

/// Prints a table every interval until `--count` tables (or forever).
pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let mut client = Client::connect(&o.socket).map_err(|e| e.to_string())?;
    let terminal = std::io::stdout().is_terminal();
    let mut last: Option<(Instant, Snapshot)> = None;
    let mut shown = 0u64;
    loop {
        let rows = client.stats().map_err(|e| e.to_string())?;
        let now = Instant::now();
        let table = render(&rows, last.as_ref().map(|(t, prev)| (now.duration_since(*t), prev)));
        if terminal {
            print!("\x1b[H\x1b[2J");
        }
        println!(
            "ferry serve at {} ({} clients with queues)\n{table}",
            o.socket.display(),
            rows.iter().filter(|r| r.kind == StatRow::CLIENT).count()
        );
        last = Some((now, rows.iter().map(|r| ((r.kind, r.id), *r)).collect()));
        shown += 1;
        if o.count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        std::thread::sleep(o.interval);
    }
}

/// The table of `rows`, with rates against `prev` (taken `dt` before) where there is one.
fn render(rows: &[StatRow], prev: Option<(Duration, &Snapshot)>) -> String {
    let rate = |row: &StatRow, i: usize| -> Option<f64> {
        let (dt, prev) = prev?;
        let before = prev.get(&(row.kind, row.id))?;
        Some(row.values[i].saturating_sub(before.values[i]) as f64 / dt.as_secs_f64().max(1e-9))
    };
    let show = |r: Option<f64>, scale: f64, unit: &str| r.map_or("-".to_owned(), |r| format!("{:.2}{unit}", r / scale));
    let mut out = String::from(
        "| client | queues | descriptors | M desc/s | GB/s | failed | in flight |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| r.kind == StatRow::CLIENT) {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            r.queues,
            r.values[0],
            show(rate(r, 0), 1e6, ""),
            show(rate(r, 1), 1e9, ""),
            r.values[2],
            r.values[3]
        );
    }
    out += "\n| worker | queues | descriptors | M desc/s | busy |\n|---|---|---|---|---|\n";
    for r in rows.iter().filter(|r| r.kind == StatRow::WORKER) {
        let busy = prev.and_then(|(_, p)| p.get(&(r.kind, r.id))).map_or("-".to_owned(), |before| {
            let loops = r.values[2].saturating_sub(before.values[2]);
            let idle = r.values[3].saturating_sub(before.values[3]);
            if loops == 0 {
                "-".to_owned()
            } else {
                format!("{:.0} %", 100.0 * (loops - idle.min(loops)) as f64 / loops as f64)
            }
        });
        out += &format!("| {} | {} | {} | {} | {busy} |\n", r.id, r.queues, r.values[0], show(rate(r, 0), 1e6, ""));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_the_differences_over_the_interval() {
        let client = |values| StatRow { kind: StatRow::CLIENT, id: 4, queues: 1, values };
        let worker = |values| StatRow { kind: StatRow::WORKER, id: 0, queues: 1, values };
        let before = [client([1_000, 0, 0, 0]), worker([1_000, 0, 1_000, 500])];
        let after = [client([2_001_000, 8_000_000_000, 3, 7]), worker([2_001_000, 0, 5_000, 1_500])];
        let prev: Snapshot = before.iter().map(|r| ((r.kind, r.id), *r)).collect();
        let table = render(&after, Some((Duration::from_millis(500), &prev)));
        // 2 M descriptors and 8 GB in half a second; the worker idle in 1000 of 4000 loops.
        assert!(table.contains("| 4 | 1 | 2001000 | 4.00 | 16.00 | 3 | 7 |"), "{table}");
        assert!(table.contains("| 0 | 1 | 2001000 | 4.00 | 75 % |"), "{table}");
        // The first table has no rates.
        let first = render(&after, None);
        assert!(first.contains("| 4 | 1 | 2001000 | - | - | 3 | 7 |"), "{first}");
    }
}
