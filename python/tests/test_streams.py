"""Copies ordered with CUDA streams: gates (opened from the CPU here, on any machine), the errors
without a CUDA context, and on a GPU with torch: loads that a stream waits for and offloads
gated on a stream, for every copy strategy, with no CPU wait between them, checked on the GPU
(destinations poisoned first)."""

import threading
import time
import unittest

import numpy as np

import ferry
from support import HostQueueCase, torch_or_skip


class HostGates(HostQueueCase):
    def test_a_gate_holds_the_copies_behind_it_until_signalled(self):
        buf = self.engine.alloc_host(self.client, 1 << 16)
        data = buf.numpy()
        data[:8] = 1
        descs = ferry.descriptors(2)
        descs[0]["flags"], descs[0]["src_offset"], descs[0]["tag"] = ferry.FLAG_GATE, 3, 7
        descs[1]["tag"], descs[1]["src_region"], descs[1]["dst_region"] = 8, buf.region, buf.region
        descs[1]["dst_offset"], descs[1]["len"] = 4096, 8
        self.assertEqual(self.queue.submit_array(descs), 2)
        self.assertEqual(self.queue.pushed, 2)
        out = ferry.completions(2)
        self.assertEqual(self.queue.wait_into(out, 1, timeout=0.05), 0, "a closed gate let a completion through")
        data[:8] = 2  # written before the signal: the copy behind the gate sees it
        self.queue.signal(3)
        self.assertEqual(self.queue.wait_into(out, 2, timeout=5), 2)
        self.assertEqual(out["tag"].tolist(), [7, 8])
        self.assertEqual(out["status"].tolist(), [0, 0])
        self.assertTrue((data[4096:4104] == 2).all())

    def test_push_blocks_behind_a_gate_and_drain(self):
        kv = np.arange(2 * 2 * 8 * 64, dtype=np.uint8).reshape(2, 2, 8, 64)
        with self.engine.register(self.client, kv) as reg:
            pool = self.engine.alloc_host(self.client, 8 * 256)
            host = pool.numpy(np.uint8, (8, 2, 2, 64))
            watermark = self.queue.push_blocks(reg.blocks(2), pool.blocks(host, 0), [5, 6], [0, 1], gate=1)
            self.assertEqual(watermark, 3)  # the gate and two blocks
            self.assertEqual(self.queue.drain(), 0)
            self.queue.signal(1)
            deadline = time.monotonic() + 5
            while self.queue.watermark < watermark and time.monotonic() < deadline:
                time.sleep(0.001)
            self.assertEqual(self.queue.drain(), 3)
            self.assertTrue(np.array_equal(host[0], kv[:, :, 5]) and np.array_equal(host[1], kv[:, :, 6]))

    def test_a_gate_times_out_per_the_queues_setting(self):
        queue = self.engine.open_queue(self.client, gate_timeout=0.03)
        queue.submit([ferry.gate(1, tag=1)])
        t0 = time.monotonic()
        (done,) = queue.wait(1)
        self.assertGreaterEqual(time.monotonic() - t0, 0.02)
        self.assertEqual((done.tag, done.status_name), (1, "gate_timeout"))
        with self.assertRaises(ferry.CopyError):
            queue.submit([ferry.gate(1, tag=2)])
            time.sleep(0.1)
            queue.drain()
        queue.close()

    def test_a_gate_with_a_length_is_refused(self):
        bad = ferry.gate(1, tag=4)
        bad.len = 16
        self.queue.submit([bad])
        (done,) = self.queue.wait(1)
        self.assertEqual((done.tag, done.status_name), (4, "reserved_flags"))

    def test_a_notification_writes_its_slot_after_the_copies_before_it(self):
        buf = self.engine.alloc_host(self.client, 1 << 16)
        descs = ferry.descriptors(2)
        descs[0]["tag"], descs[0]["src_region"], descs[0]["dst_region"] = 1, buf.region, buf.region
        descs[0]["dst_offset"], descs[0]["len"] = 4096, 64
        descs[1] = np.frombuffer(bytes(ferry.notify(5, 9, tag=2)), dtype=ferry.DESCRIPTOR_DTYPE)[0]
        done = self.queue.run(descs)
        self.assertEqual(done["tag"].tolist(), [1, 2])
        self.assertEqual(done["status"].tolist(), [0, 0])
        self.assertEqual(self.queue.slot(5), 9)
        # Still set: the next notification for the slot waits until it is cleared.
        self.queue.submit([ferry.notify(5, 10, tag=3)])
        out = ferry.completions(1)
        self.assertEqual(self.queue.wait_into(out, 1, timeout=0.05), 0)
        self.queue.clear_slot(5)
        self.assertEqual(self.queue.wait_into(out, 1, timeout=5), 1)
        self.assertEqual(self.queue.slot(5), 10)
        with self.assertRaises(ferry.FerryError):
            self.queue.slot(ferry.NOTIFY_SLOTS)

    def test_push_blocks_with_a_notification(self):
        kv = np.arange(2 * 2 * 8 * 64, dtype=np.uint8).reshape(2, 2, 8, 64)
        with self.engine.register(self.client, kv) as reg:
            pool = self.engine.alloc_host(self.client, 8 * 256)
            host = pool.numpy(np.uint8, (8, 2, 2, 64))
            watermark = self.queue.push_blocks(reg.blocks(2), pool.blocks(host, 0), [5], [0], notify=7)
            self.assertEqual(watermark, 2)  # the block and the notification
            deadline = time.monotonic() + 5
            while self.queue.slot(7) != 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            self.assertEqual(self.queue.slot(7), 1)
            self.assertTrue(np.array_equal(host[0], kv[:, :, 5]))
            self.assertEqual(self.queue.drain(), 2)

    def test_run_keeps_the_completions_of_earlier_pushes_for_the_next_poll(self):
        import threading
        buf = self.engine.alloc_host(self.client, 1 << 16)
        buf.numpy()[:64] = 9
        early = ferry.Descriptor(tag=50, src_region=buf.region, dst_region=buf.region, dst_offset=8192, len=64)
        self.queue.submit([ferry.gate(1, tag=49), early])  # held until the signal below
        threading.Timer(0.05, self.queue.signal, args=(1,)).start()
        descs = ferry.descriptors(3)
        for i in range(3):
            descs[i]["tag"], descs[i]["src_region"], descs[i]["dst_region"] = i, buf.region, buf.region
            descs[i]["dst_offset"], descs[i]["len"] = 16384 + i * 64, 64
        done = self.queue.run(descs)
        self.assertEqual(done["tag"].tolist(), [0, 1, 2], "run returned another push's completions")
        # The gate's and the early copy's completions were kept, in order, for the next poll.
        got = self.queue.poll(8)
        self.assertEqual([c.tag for c in got], [49, 50])
        self.assertTrue(all(c.status_name == "ok" for c in got))
        self.assertEqual(self.queue.poll(8), [])

    def test_stream_ordering_needs_a_cuda_context(self):
        with self.assertRaises(ferry.FerryError) as caught:
            self.queue.stream_wait(0, 1)
        self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])
        self.assertIn("no CUDA context", str(caught.exception))
        with self.assertRaises(ferry.FerryError):
            self.queue.stream_signal(0, 1)
        with self.assertRaises(ferry.FerryError):
            self.queue.stream_wait_slot(0, 0)


class StreamOrdered(unittest.TestCase):
    ITERATIONS = 300

    def run_strategy(self, strategy):
        torch = torch_or_skip(cuda=True)
        with ferry.Engine(transport="gpu", use_gdr="off", strategy=strategy, pinned=False) as engine:
            client = engine.new_client()
            layers, blocks, pool_blocks = 4, 64, 32
            kv = torch.zeros(layers, 2, blocks, 16, 8, 64, dtype=torch.float16, device="cuda")
            reg = engine.register(client, kv)
            pool = engine.alloc_host(client, pool_blocks * kv[:, :, 0].numel() * 2)
            host = pool.torch(torch.float16, (pool_blocks, layers, 2, 16, 8, 64))
            host.copy_(torch.randn(host.shape, dtype=torch.float16))
            expected = host.cuda().permute(1, 2, 0, 3, 4, 5)  # [layers, 2, pool_blocks, ...]
            gpu_side, host_side = reg.blocks(2), pool.blocks(host, 0)
            queue = engine.open_queue(client)
            stream = torch.cuda.Stream()
            wrong = torch.zeros((), dtype=torch.int64, device="cuda")
            rng = np.random.default_rng(1)
            dst_t = torch.zeros(4, dtype=torch.int64, device="cuda")
            want = torch.empty_like(kv.index_select(2, dst_t))
            with torch.cuda.stream(stream):
                # Warm-up: every kernel that runs behind a wait is loaded first (CUDA loads kernels
                # lazily, and a first load behind a wait that ferry releases may never return).
                kv.index_fill_(2, dst_t, 0.0)
                wrong += (kv.index_select(2, dst_t) != want).sum()
                kv[:, :, 0] = 1.0
                wrong.zero_()
            stream.synchronize()
            with torch.cuda.stream(stream):
                for i in range(1, self.ITERATIONS + 1):
                    src = rng.choice(pool_blocks, 4, replace=False)
                    dst = rng.choice(blocks, 4, replace=False)
                    dst_t = torch.from_numpy(dst).cuda()
                    kv.index_fill_(2, dst_t, float("nan"))  # poison, on the stream
                    queue.stream_signal(stream, i)  # the load may start once the poison is written
                    queue.push_blocks(host_side, gpu_side, src, dst, gate=i)
                    queue.stream_wait(stream)  # the check below runs once the load is done
                    got = kv.index_select(2, dst_t)
                    want = expected.index_select(2, torch.from_numpy(src).cuda())
                    wrong += (got != want).sum()
            stream.synchronize()
            queue.drain()
            self.assertEqual(int(wrong), 0, f"{strategy}: stale or wrong bytes after stream_wait")
            # The same loads, the wait and the check captured once as a CUDA graph and replayed:
            # each replay waits for the step's notification (slot 0) and clears it.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                queue.stream_wait_slot(stream, 0)
                wrong += (kv.index_select(2, dst_t) != want).sum()
            with torch.cuda.stream(stream):
                for i in range(self.ITERATIONS + 1, 2 * self.ITERATIONS + 1):
                    src = rng.choice(pool_blocks, 4, replace=False)
                    dst = rng.choice(blocks, 4, replace=False)
                    dst_t.copy_(torch.from_numpy(dst), non_blocking=True)
                    want.copy_(expected.index_select(2, torch.from_numpy(src).cuda()))
                    kv.index_fill_(2, dst_t, float("nan"))
                    queue.stream_signal(stream, i)
                    queue.push_blocks(host_side, gpu_side, src, dst, gate=i, notify=0)
                    graph.replay()
            stream.synchronize()
            queue.drain()
            self.assertEqual(int(wrong), 0, f"{strategy}: stale or wrong bytes after a replayed graph's wait")
            # Offloads gated on the stream: the stream writes a block, then signals; the copy
            # behind the gate must see what the stream wrote.
            stale = 0
            with torch.cuda.stream(stream):
                for i in range(1, 51):
                    block = int(rng.integers(blocks))
                    kv[:, :, block] = float(i)
                    value = self.ITERATIONS + i
                    queue.stream_signal(stream, value)
                    watermark = queue.push_blocks(gpu_side, host_side, [block], [i % pool_blocks], gate=value)
                    deadline = time.monotonic() + 10
                    while queue.watermark < watermark:
                        self.assertLess(time.monotonic(), deadline, "a gated offload never completed")
                    queue.drain()
                    stale += int((host[i % pool_blocks] != float(i)).sum())
            self.assertEqual(stale, 0, f"{strategy}: a gated offload read bytes from before the signal")
            print(f"{strategy}: {self.ITERATIONS} stream-ordered loads, as many through a replayed CUDA graph, and 50 "
                  "gated offloads: no stale byte")
            queue.close()
            reg.close()

    def test_memcpy(self):
        self.run_strategy("memcpy")

    def test_batch(self):
        self.run_strategy("batch")

    def test_kernel(self):
        self.run_strategy("kernel")

    def test_resident(self):
        self.run_strategy("resident")

    def test_auto(self):
        self.run_strategy("auto")


class ResidentEnds(unittest.TestCase):
    def test_a_device_wide_synchronize_returns_while_the_engine_runs(self):
        # The resident kernel ends by itself once idle (200 us), so torch.cuda.synchronize()
        # returns with the engine still open: before, it waited for the engine's shutdown.
        torch = torch_or_skip(cuda=True)
        with ferry.Engine(transport="gpu", use_gdr="off", strategy="resident", pinned=False) as engine:
            client = engine.new_client()
            kv = torch.zeros(64, 4096, dtype=torch.uint8, device="cuda")
            reg = engine.register(client, kv)
            pool = engine.alloc_host(client, kv.numel())
            host = pool.torch(torch.uint8, tuple(kv.shape))
            host.copy_(torch.randint(0, 256, kv.shape, dtype=torch.uint8))
            queue = engine.open_queue(client)
            torch.cuda.synchronize()
            for _ in range(3):
                queue.push_blocks(pool.blocks(host, 0), reg.blocks(0), range(64), range(64))
                queue.drain()
                finished = threading.Event()
                start = time.monotonic()
                waiter = threading.Thread(target=lambda: (torch.cuda.synchronize(), finished.set()), daemon=True)
                waiter.start()
                waiter.join(timeout=10)
                self.assertTrue(finished.is_set(), "torch.cuda.synchronize() did not return within 10 s "
                                "with a resident engine open and idle")
                took = time.monotonic() - start
            self.assertTrue(torch.equal(kv.cpu(), host), "the resident kernel's copies differ")
            print(f"resident: torch.cuda.synchronize() returned {took * 1e3:.2f} ms after the copies completed")
            queue.close()
            reg.close()


if __name__ == "__main__":
    unittest.main()
