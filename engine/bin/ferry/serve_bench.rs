//! `ferry bench-serve`: client processes pushing 4 KiB descriptors through a `ferry serve`
//! daemon on the null transport, against one client thread of an engine in this process, in
//! alternating rounds of one run (issue 14's target: four clients together at least 0.8 of one
//! in-process client's descriptor rate).
//!
//! Every client (thread or process) is pinned to core 0 and the engine's one worker to the
//! topology plan's core; each process connects, allocates two regions, opens a queue, says
//! "ready" and waits for "go" on stdin, so that all push at once; the rate is all descriptors
//! over the span from the first start to the last end (CLOCK_MONOTONIC, shared by processes).

use ferry::{Client, Descriptor, Engine, EngineConfig, Queue, RegionId, TransportKind};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const USAGE: &str = "usage: ferry bench-serve [--clients N] [--descriptors N] [--rounds N] [--kill]
  --kill: instead, the clients push for 2 s and one is SIGKILLed after 1 s: the others'
          descriptors per 10 ms around the kill, and how long until the killed client's
          queues are freed (the daemon's workers serve one queue fewer)";

/// Bins of the fault run.
const BIN_NS: u64 = 10_000_000;

const BATCH: usize = 256;

/// Nanoseconds of CLOCK_MONOTONIC.
fn now_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pushes `n` 4 KiB descriptors between two regions and takes their completions; returns the
/// (start, end) nanoseconds. Fails on a completion that is not ok.
fn push(queue: &mut Queue, src: RegionId, dst: RegionId, n: u64) -> Result<(u64, u64), String> {
    let batch: Vec<Descriptor> =
        (0..BATCH as u64).map(|i| Descriptor::copy(src, i * 4096, dst, i * 4096, 4096)).collect();
    let mut done = vec![ferry::Completion::default(); BATCH * 4];
    let (mut pushed, mut completed) = (0u64, 0u64);
    let start = now_ns();
    while completed < n {
        if pushed < n {
            let want = (n - pushed).min(BATCH as u64) as usize;
            pushed += queue.submit(&batch[..want]).map_err(|e| e.to_string())? as u64;
        }
        let got = queue.poll(&mut done).map_err(|e| e.to_string())?;
        if let Some(bad) = done[..got].iter().find(|c| !c.is_ok()) {
            return Err(format!("a descriptor failed: {:?}", bad.status()));
        }
        completed += got as u64;
    }
    Ok((start, now_ns()))
}

/// Pushes and polls from `start` to `end` (CLOCK_MONOTONIC ns), counting the completions of
/// each BIN_NS from `start`.
fn push_for(queue: &mut Queue, src: RegionId, dst: RegionId, start: u64, end: u64) -> Result<Vec<u64>, String> {
    let batch: Vec<Descriptor> =
        (0..BATCH as u64).map(|i| Descriptor::copy(src, i * 4096, dst, i * 4096, 4096)).collect();
    let mut done = vec![ferry::Completion::default(); BATCH * 4];
    let mut bins = vec![0u64; (end - start).div_ceil(BIN_NS) as usize];
    while now_ns() < start {
        std::hint::spin_loop();
    }
    let mut in_flight = 0u64;
    loop {
        let now = now_ns();
        if now >= end {
            return Ok(bins);
        }
        if in_flight < 4 * BATCH as u64 {
            in_flight += queue.submit(&batch).map_err(|e| e.to_string())? as u64;
        }
        let got = queue.poll(&mut done).map_err(|e| e.to_string())?;
        in_flight -= got as u64;
        bins[((now - start) / BIN_NS) as usize] += got as u64;
    }
}

/// The child: connect, set up, "ready", wait for "go" (or "go START END"), push, print
/// "start end" (or the bins).
pub fn client(args: &[String]) -> Result<(), String> {
    let [socket, n] = args else { return Err("bench-serve-client SOCKET N".into()) };
    let n: u64 = n.parse().map_err(|_| "N: a number")?;
    ferry::internals::sys::pin_current_thread(0).map_err(|e| e.to_string())?;
    let mut client = Client::connect(socket).map_err(|e| e.to_string())?;
    let src = client.alloc_host(BATCH * 4096).map_err(|e| e.to_string())?;
    let dst = client.alloc_host(BATCH * 4096).map_err(|e| e.to_string())?;
    let mut queue = client.open_queue(16384, 16384).map_err(|e| e.to_string())?;
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
    if let [_, start, end] = line.split_whitespace().collect::<Vec<_>>()[..] {
        let (start, end) = (start.parse().map_err(|_| "START")?, end.parse().map_err(|_| "END")?);
        let bins = push_for(&mut queue, src.id(), dst.id(), start, end)?;
        println!("{}", bins.iter().map(u64::to_string).collect::<Vec<_>>().join(" "));
        return Ok(());
    }
    let (start, end) = push(&mut queue, src.id(), dst.id(), n)?;
    println!("{start} {end}");
    Ok(())
}

/// Starts `clients` client processes on the daemon at `socket`; each has said "ready".
fn start_clients(
    socket: &str,
    clients: usize,
    per: u64,
) -> Result<Vec<(std::process::Child, BufReader<std::process::ChildStdout>)>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    for _ in 0..clients {
        let mut child = Command::new(&exe)
            .args(["bench-serve-client", socket, &per.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("a client said {line:?} instead of ready"));
        }
        children.push((child, out));
    }
    Ok(children)
}

/// The fault run: `clients` push for 2 s; client 0 is SIGKILLed at 1 s. Prints the others'
/// descriptors per bin around the kill against their median bin before it, and the time from
/// the kill until the daemon's workers serve its queue no more.
fn kill_run(socket: &str, clients: usize) -> Result<(), String> {
    if clients < 2 {
        return Err("--kill needs at least 2 clients".into());
    }
    let mut watcher = Client::connect(socket).map_err(|e| e.to_string())?;
    let served = |w: &mut Client| -> Result<u64, String> {
        let rows = w.stats().map_err(|e| e.to_string())?;
        Ok(rows.iter().filter(|r| r.kind == ferry::control::StatRow::WORKER).map(|r| u64::from(r.queues)).sum())
    };
    let before = served(&mut watcher)?;
    let mut children = start_clients(socket, clients, 0)?;
    let start = now_ns() + 50_000_000;
    let (kill_at, end) = (start + 1_000_000_000, start + 2_000_000_000);
    for (child, _) in &mut children {
        writeln!(child.stdin.as_mut().expect("piped"), "go {start} {end}").map_err(|e| e.to_string())?;
    }
    while now_ns() < kill_at {
        std::thread::sleep(Duration::from_micros(200));
    }
    let (mut victim, _) = children.remove(0);
    victim.kill().map_err(|e| e.to_string())?;
    let killed = now_ns();
    victim.wait().map_err(|e| e.to_string())?;
    // The daemon's workers serve its queue until they see the client gone and free it.
    let freed = loop {
        if served(&mut watcher)? < before + clients as u64 {
            break now_ns();
        }
        if now_ns() > killed + 5_000_000_000 {
            return Err("the killed client's queue was still served 5 s after the kill".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let mut total: Vec<u64> = Vec::new();
    for (mut child, mut out) in children {
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        child.wait().map_err(|e| e.to_string())?;
        let bins: Vec<u64> = line.split_whitespace().filter_map(|b| b.parse().ok()).collect();
        total.resize(total.len().max(bins.len()), 0);
        for (t, b) in total.iter_mut().zip(bins) {
            *t += b;
        }
    }
    let kill_bin = ((killed - start) / BIN_NS) as usize;
    // Before: the second half-second (the first warms up).
    let mut before_bins: Vec<u64> = total[kill_bin.saturating_sub(50)..kill_bin.saturating_sub(1)].to_vec();
    before_bins.sort_unstable();
    let median = before_bins.get(before_bins.len() / 2).copied().unwrap_or(0).max(1) as f64;
    let after: Vec<f64> =
        total[kill_bin..(kill_bin + 10).min(total.len())].iter().map(|&b| b as f64 / median).collect();
    let later: Vec<f64> = total[(kill_bin + 10).min(total.len())..total.len().saturating_sub(1)]
        .iter()
        .map(|&b| b as f64 / median)
        .collect();
    let below = |v: &[f64]| v.iter().filter(|&&r| r < 0.9).count();
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "null transport, 4 KiB descriptors, {clients} client processes pushing for 2 s, client 0 SIGKILLed at 1 s:"
    );
    println!("| what | value |");
    println!("|---|---|");
    println!(
        "| the killed client's queue no longer served (its memory freed), after the kill | {:.1} ms |",
        (freed - killed) as f64 / 1e6
    );
    println!("| the others' median 10 ms bin before the kill | {:.0} descriptors ({:.2} M/s) |", median, median / 1e4);
    println!(
        "| their 10 ms bins in the 100 ms after the kill, / that median | {} |",
        after.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
    );
    println!(
        "| bins below 0.9: in the 100 ms after the kill / in the rest of the run after it | {} of {} / {} of {} |",
        below(&after),
        after.len(),
        below(&later),
        later.len()
    );
    println!("| lowest bin after the kill / in the rest | {:.2} / {:.2} |", min(&after), min(&later));
    Ok(())
}

/// One round through the daemon at `socket`: `clients` processes of `n / clients` descriptors
/// each; returns descriptors/s.
fn through_daemon(socket: &str, clients: usize, n: u64) -> Result<f64, String> {
    let per = n / clients as u64;
    let mut children = start_clients(socket, clients, per)?;
    for (child, _) in &mut children {
        writeln!(child.stdin.as_mut().expect("piped"), "go").map_err(|e| e.to_string())?;
    }
    let (mut first, mut last) = (u64::MAX, 0u64);
    for (mut child, mut out) in children {
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let status = child.wait().map_err(|e| e.to_string())?;
        let times: Vec<u64> = line.split_whitespace().filter_map(|t| t.parse().ok()).collect();
        let [start, end] = times[..] else { return Err(format!("a client ({status}) printed {line:?}")) };
        (first, last) = (first.min(start), last.max(end));
    }
    Ok((per * clients as u64) as f64 / ((last - first) as f64 / 1e9))
}

/// One round in this process: one client thread on core 0, `n` descriptors.
fn in_process(n: u64) -> Result<f64, String> {
    let engine = Engine::start(EngineConfig { transport: TransportKind::Null, ..EngineConfig::default() })
        .map_err(|e| e.to_string())?;
    let client = engine.new_client();
    let src = engine.allocate_host(client, BATCH * 4096).map_err(|e| e.to_string())?;
    let dst = engine.allocate_host(client, BATCH * 4096).map_err(|e| e.to_string())?;
    let config = ferry::QueueConfig { submit_capacity: 16384, complete_capacity: 16384, ..Default::default() };
    let mut queue = engine.open_queue(client, config).map_err(|e| e.to_string())?;
    let rate = std::thread::scope(|s| {
        s.spawn(|| {
            ferry::internals::sys::pin_current_thread(0).map_err(|e| e.to_string())?;
            let (start, end) = push(&mut queue, src.id(), dst.id(), n)?;
            Ok::<f64, String>(n as f64 / ((end - start) as f64 / 1e9))
        })
        .join()
        .expect("the client thread does not panic")
    })?;
    drop(queue);
    engine.shutdown();
    Ok(rate)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let (mut clients, mut n, mut rounds, mut kill) = (4usize, 20_000_000u64, 3usize, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--kill" {
            kill = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number = |v: &str| super::parse_number(v, 1000);
        match arg.as_str() {
            "--clients" => clients = number(value)? as usize,
            "--descriptors" => n = number(value)?,
            "--rounds" => rounds = number(value)? as usize,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if clients == 0 || rounds == 0 {
        return Err("--clients and --rounds: at least 1".into());
    }
    let socket = std::env::temp_dir().join(format!("ferry-bench-serve-{}.sock", std::process::id()));
    let socket = socket.to_str().ok_or("a temporary path that is not UTF-8")?.to_owned();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut daemon = Command::new(&exe)
        .args(["serve", "--socket", &socket, "--transport", "null", "--quiet"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Client::connect(&socket).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = daemon.kill();
            return Err("the daemon did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if kill {
        let result = kill_run(&socket, clients);
        // SAFETY: signals our own child.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        let _ = daemon.wait();
        return result;
    }
    let mut local = Vec::new();
    let mut served = Vec::new();
    let result = (|| {
        for round in 0..rounds {
            local.push(in_process(n)?);
            served.push(through_daemon(&socket, clients, n)?);
            eprintln!(
                "round {}/{rounds}: in-process {:.2} M/s, {clients} clients through the daemon {:.2} M/s",
                round + 1,
                local[round] / 1e6,
                served[round] / 1e6
            );
        }
        Ok::<(), String>(())
    })();
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    result?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (l, s) = (median(&mut local), median(&mut served));
    println!("null transport, 4 KiB descriptors, {n} per round, medians of {rounds} alternating rounds:");
    println!("| path | M descriptors/s | / in-process |");
    println!("|---|---|---|");
    println!("| one client thread, engine in this process | {:.2} | 1.00 |", l / 1e6);
    println!("| {clients} client processes through `ferry serve` | {:.2} | {:.2} |", s / 1e6, s / l);
    Ok(())
}
