use ferry::internals::cuda::*;
use std::time::Instant;
fn pin(c: usize) { core_affinity::set_for_current(core_affinity::CoreId { id: c }); }
fn pct(v: &mut Vec<f64>, q: f64) -> f64 { v.sort_by(f64::total_cmp); v[((v.len()-1) as f64*q) as usize] }
fn main() {
    let core: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    pin(core);
    let driver = Driver::load().unwrap();
    let ctx = Context::new(&driver, 0).unwrap();
    ctx.make_current().unwrap();
    let host = PinnedBuffer::new(1 << 20).unwrap();
    let dev = DeviceBuffer::new(1 << 20).unwrap();
    let word = host.as_ptr() as u64 + 65536; // a word in pinned, mapped host memory
    let stream = Stream::new().unwrap();
    let event = Event::new().unwrap();
    let names = ["sync", "event-query", "write-value+load", "event-query after 1us"];
    for (h2d, dir) in [(true, "H2D"), (false, "D2H")] {
        let (dst, src) = if h2d { (dev.ptr(), host.as_ptr() as u64) } else { (host.as_ptr() as u64, dev.ptr()) };
        let mut t: Vec<Vec<f64>> = vec![Vec::new(); 4];
        let (mut queries, mut query_ns, mut rec_ns, mut copy_ns) = (0u64, 0f64, 0f64, 0f64);
        let mut seq = 0u64;
        for round in 0..10 {
            for mode in 0..4 {
                for i in 0..550 {
                    let s = Instant::now();
                    unsafe { stream.copy(dst, src, 4096).unwrap() };
                    let c = s.elapsed();
                    match mode {
                        0 => stream.synchronize().unwrap(),
                        1 | 3 => {
                            let r = Instant::now();
                            event.record(&stream).unwrap();
                            if mode == 1 { rec_ns += r.elapsed().as_nanos() as f64; copy_ns += c.as_nanos() as f64; }
                            if mode == 3 { while s.elapsed().as_nanos() < 1000 {} }
                            loop { let q = Instant::now(); let d = event.is_done().unwrap(); if mode == 1 { query_ns += q.elapsed().as_nanos() as f64; queries += 1; } if d { break } }
                        }
                        _ => {
                            seq += 1;
                            unsafe { stream_write_value(stream.handle(), word, seq).unwrap() };
                            while unsafe { std::ptr::read_volatile(word as *const u64) } != seq { std::hint::spin_loop() }
                        }
                    }
                    if i >= 50 { t[mode].push(s.elapsed().as_secs_f64() * 1e6); }
                }
                let _ = round;
            }
        }
        for m in 0..4 { let p50 = pct(&mut t[m], 0.5); let p99 = pct(&mut t[m], 0.99); println!("core {core} {dir} {:<24} p50 {p50:.2} us p99 {p99:.2} us", names[m]); }
        let n = 5000.0;
        println!("core {core} {dir} cuMemcpyAsync call {:.2} us, cuEventRecord {:.2} us, cuEventQuery {:.3} us x {:.1} per copy", copy_ns/n/1e3, rec_ns/n/1e3, query_ns/queries as f64/1e3, queries as f64/n);
    }
}
