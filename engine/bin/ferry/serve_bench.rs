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

pub const USAGE: &str = "usage: ferry bench-serve [--clients N] [--descriptors N] [--rounds N]";

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

/// The child: connect, set up, "ready", wait for "go", push, print "start end".
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
    let (start, end) = push(&mut queue, src.id(), dst.id(), n)?;
    println!("{start} {end}");
    Ok(())
}

/// One round through the daemon at `socket`: `clients` processes of `n / clients` descriptors
/// each; returns descriptors/s.
fn through_daemon(socket: &str, clients: usize, n: u64) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let per = n / clients as u64;
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
    let (mut clients, mut n, mut rounds) = (4usize, 20_000_000u64, 3usize);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
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
