//! A loom model of the ring: every interleaving of one producer and one consumer, with each
//! slot in a loom cell so that an access the indices fail to order is reported.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --lib --release ring::loom_model`

use super::heap_ring;

#[test]
fn push_pop_in_order_without_races() {
    loom::model(|| {
        let (mut producer, mut consumer) = heap_ring::<u64>(2);
        let t = loom::thread::spawn(move || {
            for i in 0..3u64 {
                let mut item = i;
                loop {
                    match producer.push(item) {
                        Ok(()) => break,
                        Err(e) => item = e.into_inner(),
                    }
                    loom::thread::yield_now();
                }
            }
        });
        let mut next = 0;
        while next < 3 {
            match consumer.pop().unwrap() {
                Some(x) => {
                    assert_eq!(x, next);
                    next += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}

#[test]
fn batches_publish_whole() {
    loom::model(|| {
        let (mut producer, mut consumer) = heap_ring::<u64>(4);
        let t = loom::thread::spawn(move || {
            let mut batch = producer.write();
            batch.push(10).unwrap();
            batch.push(11).unwrap();
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let mut batch = consumer.read(4).unwrap();
            // A batch is published with one store: never half of it.
            assert!(batch.len() == 0 || batch.len() == 2);
            seen.extend(batch.by_ref());
            drop(batch);
            loom::thread::yield_now();
        }
        assert_eq!(seen, vec![10, 11]);
        t.join().unwrap();
    });
}
