use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::Instant;
const CAP: usize = 64;
static mut CORES: (usize,usize) = (0,1);
#[repr(C, align(128))] struct Pad(AtomicU64);
#[repr(C, align(64))] #[derive(Clone, Copy, Default)] struct Desc([u64; 8]);
// A: index ring
struct RingA { tail: Pad, head: Pad, slots: Vec<std::cell::UnsafeCell<Desc>> }
unsafe impl Sync for RingA {}
// B: stamped slots (stamp at a given word offset in a slot of SLOT words)
#[repr(C, align(128))] struct SlotB { d: std::cell::UnsafeCell<[u64;8]>, stamp: AtomicU64, _p: [u64; 7] }
#[repr(C, align(64))] struct SlotC { d: std::cell::UnsafeCell<[u64;7]>, stamp: AtomicU64 }
struct RingB { slots: Vec<SlotB> } unsafe impl Sync for RingB {}
struct RingC { slots: Vec<SlotC> } unsafe impl Sync for RingC {}
#[inline(always)] fn pf(p: *const u8) { unsafe { std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0) } }
fn pin(c: usize) { core_affinity::set_for_current(core_affinity::CoreId { id: c }); }
fn med(mut v: Vec<f64>) -> (f64,f64) { v.sort_by(f64::total_cmp); (v[v.len()/2], v[v.len()*99/100]) }
fn run_a(n: usize) -> Vec<f64> {
    let mk = || Arc::new(RingA { tail: Pad(AtomicU64::new(0)), head: Pad(AtomicU64::new(0)), slots: (0..CAP).map(|_| Default::default()).collect() });
    let (there, back) = (mk(), mk());
    let (t2, b2) = (there.clone(), back.clone());
    let h = std::thread::spawn(move || { pin(unsafe{CORES.1}); for i in 0..n as u64 {
        while t2.tail.0.load(Acquire) <= i { std::hint::spin_loop() }
        let d = unsafe { *t2.slots[i as usize % CAP].get() };
        t2.head.0.store(i+1, Release);
        unsafe { *b2.slots[i as usize % CAP].get() = d; }
        b2.tail.0.store(i+1, Release);
    }});
    pin(unsafe{CORES.0}); let mut t = Vec::new();
    for i in 0..n as u64 { let s = Instant::now();
        unsafe { *there.slots[i as usize % CAP].get() = Desc([i;8]); }
        there.tail.0.store(i+1, Release);
        while back.tail.0.load(Acquire) <= i { std::hint::spin_loop() }
        let d = unsafe { *back.slots[i as usize % CAP].get() }; assert_eq!(d.0[0], i);
        back.head.0.store(i+1, Release);
        t.push(s.elapsed().as_secs_f64()*1e6); }
    h.join().unwrap(); t
}
fn run_p(n: usize) -> Vec<f64> {
    let mk = || Arc::new(RingA { tail: Pad(AtomicU64::new(0)), head: Pad(AtomicU64::new(0)), slots: (0..CAP).map(|_| Default::default()).collect() });
    let (there, back) = (mk(), mk());
    let (t2, b2) = (there.clone(), back.clone());
    let h = std::thread::spawn(move || { pin(unsafe{CORES.1}); for i in 0..n as u64 {
        loop { pf(t2.slots[i as usize % CAP].get() as *const u8); if t2.tail.0.load(Acquire) > i { break } std::hint::spin_loop() }
        let d = unsafe { *t2.slots[i as usize % CAP].get() };
        t2.head.0.store(i+1, Release);
        unsafe { *b2.slots[i as usize % CAP].get() = d; }
        b2.tail.0.store(i+1, Release);
    }});
    pin(unsafe{CORES.0}); let mut t = Vec::new();
    for i in 0..n as u64 { let s = Instant::now();
        unsafe { *there.slots[i as usize % CAP].get() = Desc([i;8]); }
        there.tail.0.store(i+1, Release);
        loop { pf(back.slots[i as usize % CAP].get() as *const u8); if back.tail.0.load(Acquire) > i { break } std::hint::spin_loop() }
        let d = unsafe { *back.slots[i as usize % CAP].get() }; assert_eq!(d.0[0], i);
        back.head.0.store(i+1, Release);
        t.push(s.elapsed().as_secs_f64()*1e6); }
    h.join().unwrap(); t
}
fn run_b(n: usize) -> Vec<f64> {
    let mk = || Arc::new(RingB { slots: (0..CAP).map(|_| SlotB { d: Default::default(), stamp: AtomicU64::new(0), _p: [0;7] }).collect() });
    let (there, back) = (mk(), mk()); let (t2, b2) = (there.clone(), back.clone());
    let h = std::thread::spawn(move || { pin(unsafe{CORES.1}); for i in 0..n as u64 { let s = &t2.slots[i as usize % CAP];
        while s.stamp.load(Acquire) != i+1 { std::hint::spin_loop() }
        let d = unsafe { *s.d.get() }; let o = &b2.slots[i as usize % CAP];
        unsafe { *o.d.get() = d; } o.stamp.store(i+1, Release); }});
    pin(unsafe{CORES.0}); let mut t = Vec::new();
    for i in 0..n as u64 { let s0 = Instant::now(); let s = &there.slots[i as usize % CAP];
        unsafe { *s.d.get() = [i;8]; } s.stamp.store(i+1, Release);
        let o = &back.slots[i as usize % CAP];
        while o.stamp.load(Acquire) != i+1 { std::hint::spin_loop() }
        let d = unsafe { *o.d.get() }; assert_eq!(d[0], i);
        t.push(s0.elapsed().as_secs_f64()*1e6); }
    h.join().unwrap(); t
}
fn run_c(n: usize) -> Vec<f64> {
    let mk = || Arc::new(RingC { slots: (0..CAP).map(|_| SlotC { d: Default::default(), stamp: AtomicU64::new(0) }).collect() });
    let (there, back) = (mk(), mk()); let (t2, b2) = (there.clone(), back.clone());
    let h = std::thread::spawn(move || { pin(unsafe{CORES.1}); for i in 0..n as u64 { let s = &t2.slots[i as usize % CAP];
        while s.stamp.load(Acquire) != i+1 { std::hint::spin_loop() }
        let d = unsafe { *s.d.get() }; let o = &b2.slots[i as usize % CAP];
        unsafe { *o.d.get() = d; } o.stamp.store(i+1, Release); }});
    pin(unsafe{CORES.0}); let mut t = Vec::new();
    for i in 0..n as u64 { let s0 = Instant::now(); let s = &there.slots[i as usize % CAP];
        unsafe { *s.d.get() = [i;7]; } s.stamp.store(i+1, Release);
        let o = &back.slots[i as usize % CAP];
        while o.stamp.load(Acquire) != i+1 { std::hint::spin_loop() }
        let d = unsafe { *o.d.get() }; assert_eq!(d[0], i);
        t.push(s0.elapsed().as_secs_f64()*1e6); }
    h.join().unwrap(); t
}
fn main() { let a: Vec<usize> = std::env::args().skip(1).map(|x| x.parse().unwrap()).collect(); let (c0,c1) = if a.len()==2 {(a[0],a[1])} else {(0,1)}; unsafe { CORES = (c0,c1); } let n = 200000; for r in 0..3 {
    let a = med(run_a(n)); let p = med(run_p(n)); let b = med(run_b(n)); let c = med(run_c(n));
    println!("cores {c0},{c1} round {r}: index ring p50 {:.3} p99 {:.3} | index+prefetch p50 {:.3} p99 {:.3} | stamp 128B slot p50 {:.3} p99 {:.3} | stamp 64B slot p50 {:.3} p99 {:.3}", a.0,a.1,p.0,p.1,b.0,b.1,c.0,c.1); } }
