"""The package's array paths and block helper: submit_array / poll_into with numpy arrays and
torch tensors, Blocks layouts of paged KV caches, copy_blocks byte for byte against numpy
indexing, and a clear error for each bad input. Host transport (GPU cases SKIP without torch and
a CUDA device). Run from this folder against the installed package, or with FERRY_LIB set."""

import os
import pathlib
import sys
import threading
import time
import unittest

import numpy as np

import ferry
from support import HostQueueCase, torch_or_skip


class Installed(unittest.TestCase):
    def test_the_installed_package_carries_its_library(self):
        """In CI (FERRY_EXPECT_INSTALLED=1, after `pip install ./python`) the package is the
        installed one and loads the libferry built into it, not the repository's."""
        if not os.environ.get("FERRY_EXPECT_INSTALLED"):
            print("SKIP: FERRY_EXPECT_INSTALLED is not set: the package may be the source tree")
            self.skipTest("not the installed package")
        package = pathlib.Path(ferry.__file__).resolve().parent
        self.assertIn("site-packages", package.parts)
        self.assertEqual(pathlib.Path(ferry.library_path()).resolve().parent, package)
        self.assertTrue((package / "py.typed").exists(), "the package ships its type hints marker")


class ArrayPaths(HostQueueCase):
    def test_submit_array_and_poll_into_move_scattered_blocks(self):
        block, n = 4096, 300
        src, dst = self.engine.alloc_host(self.client, n * block), self.engine.alloc_host(self.client, n * block)
        data = np.frombuffer(os.urandom(n * block), np.uint8)
        src.numpy()[:] = data
        order = np.random.default_rng(1).permutation(n)
        descs = ferry.descriptors(n)
        descs["tag"] = np.arange(n) + 1000
        descs["src_region"], descs["dst_region"], descs["len"] = src.region, dst.region, block
        descs["src_offset"], descs["dst_offset"] = order * block, np.arange(n) * block
        out = ferry.completions(n)
        pushed = done = 0
        while done < n:
            pushed += self.queue.submit_array(descs[pushed:])
            done += self.queue.poll_into(out[done:])
        self.assertEqual(out["tag"].tolist(), list(range(1000, 1000 + n)))
        self.assertEqual(out["seq"].tolist(), list(range(n)))
        self.assertTrue((out["status"] == ferry.STATUS["ok"]).all())
        self.assertTrue((out["bytes"] == block).all())
        got = dst.numpy().reshape(n, block)
        self.assertTrue(np.array_equal(got, data.reshape(n, block)[order]))

    def test_run_submits_more_than_the_ring_holds(self):
        """run() pushes as the ring makes room: 5000 descriptors through a 256-slot queue."""
        queue = self.engine.open_queue(self.client, submit_capacity=256, complete_capacity=256)
        buf = self.engine.alloc_host(self.client, 8192)
        buf.numpy()[:64] = 7
        descs = ferry.descriptors(5000)
        descs["tag"] = np.arange(5000)
        descs["src_region"] = descs["dst_region"] = buf.region
        descs["dst_offset"], descs["len"] = 4096, 64
        done = queue.run(descs)
        self.assertEqual(done["tag"].tolist(), list(range(5000)))
        self.assertTrue((done["status"] == 0).all())
        self.assertTrue((buf.numpy()[4096:4160] == 7).all())
        queue.close()

    def test_wait_into_lets_other_threads_run(self):
        """wait_into spins inside libferry with the GIL released: with forced GIL switches made
        rare, another Python thread still runs during the wait; the wait ends at its timeout
        with nothing, and then takes a completion that arrives."""
        ticks, stop = [0], threading.Event()

        def ticker():
            while not stop.is_set():
                ticks[0] += 1
                time.sleep(0.0005)  # gives the GIL back each time; needs it back to go on

        interval = sys.getswitchinterval()
        sys.setswitchinterval(10.0)  # no forced switch during the test: only a released GIL lets it tick
        thread = threading.Thread(target=ticker)
        try:
            thread.start()
            time.sleep(0.01)
            out = ferry.completions(4)
            before, t0 = ticks[0], time.monotonic()
            self.assertEqual(self.queue.wait_into(out, 1, timeout=0.2), 0)
            self.assertGreaterEqual(time.monotonic() - t0, 0.2)
            self.assertGreater(ticks[0] - before, 20, "the other thread did not run during the wait")
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(interval)
        buf = self.engine.alloc_host(self.client, 8192)
        descs = ferry.descriptors(3)
        descs["tag"] = [1, 2, 3]
        descs["src_region"] = descs["dst_region"] = buf.region
        descs["dst_offset"], descs["len"] = 4096, 8
        self.assertEqual(self.queue.submit_array(descs), 3)
        t0 = time.monotonic()
        self.assertEqual(self.queue.wait_into(out[:2], 9, timeout=5), 2)  # at_least capped at out's length
        self.assertLess(time.monotonic() - t0, 4, "a capped wait ran into its timeout")
        self.assertEqual(self.queue.wait_into(out[2:], 1, timeout=5), 1)
        self.assertEqual(out["tag"][:3].tolist(), [1, 2, 3])

    def test_bad_arrays_are_refused_before_the_call(self):
        with self.assertRaisesRegex(TypeError, "DESCRIPTOR_DTYPE"):
            self.queue.submit_array(np.zeros(4, np.uint64))
        with self.assertRaisesRegex(TypeError, "contiguous"):
            self.queue.submit_array(ferry.descriptors(8)[::2])
        with self.assertRaisesRegex(TypeError, "COMPLETION_DTYPE"):
            self.queue.poll_into(ferry.descriptors(4))
        read_only = ferry.completions(4)
        read_only.flags.writeable = False
        with self.assertRaisesRegex(ValueError, "read-only"):
            self.queue.poll_into(read_only)
        with self.assertRaisesRegex(TypeError, "list"):
            self.queue.submit_array([1, 2, 3])

    def test_torch_int64_tensors_are_descriptor_and_completion_arrays(self):
        torch = torch_or_skip()
        buf = self.engine.alloc_host(self.client, 8192)
        view = buf.torch()  # no copy: writes through the tensor land in the buffer
        view[:16] = torch.arange(16, dtype=torch.uint8)
        self.assertEqual(bytes(buf.view()[:16]), bytes(range(16)))
        descs = ferry.descriptors(2)
        descs["tag"] = [1, 2]
        descs["src_region"] = descs["dst_region"] = buf.region
        descs["dst_offset"], descs["len"] = [4096, 6144], 16
        words = torch.from_numpy(descs.view(np.int64).reshape(2, 8).copy())
        self.assertEqual(self.queue.submit_array(words), 2)
        out = torch.zeros(2, 4, dtype=torch.int64)
        got = 0
        while got < 2:
            got += self.queue.poll_into(out[got:])
        self.assertEqual(out[:, 0].tolist(), [1, 2])  # tag
        self.assertEqual(out[:, 3].tolist(), [0, 0])  # status (low word) and detail
        self.assertTrue(torch.equal(view[4096:4112], view[:16]) and torch.equal(view[6144:6160], view[:16]))
        with self.assertRaisesRegex(TypeError, r"\[n, 8\]"):
            self.queue.submit_array(torch.zeros(2, 4, dtype=torch.int64))
        with self.assertRaisesRegex(TypeError, "int64"):
            self.queue.submit_array(torch.zeros(2, 8, dtype=torch.int32))

    def test_registering_a_torch_cpu_tensor(self):
        torch = torch_or_skip()
        t = torch.arange(1024, dtype=torch.int32)
        with self.engine.register(self.client, t) as reg:
            self.assertEqual((reg.address, reg.size), (t.data_ptr(), 4096))
        with self.assertRaisesRegex(ValueError, "not contiguous"):
            self.engine.register(self.client, torch.zeros(8, 8)[:, ::2])


class Blocks(unittest.TestCase):
    """A paged KV cache [layers, 2, num_blocks, tokens, heads, dim] and a host pool of the same
    block shape [pool_blocks, layers, 2, tokens, heads, dim], both numpy, host transport."""

    LAYERS, TOKENS, HEADS, DIM = 4, 4, 2, 8

    def setUp(self):
        self.engine = ferry.Engine(pinned=False)
        self.client = self.engine.new_client()
        self.queue = self.engine.open_queue(self.client)
        rng = np.random.default_rng(5)
        self.kv = rng.integers(0, 1 << 16, (self.LAYERS, 2, 32, self.TOKENS, self.HEADS, self.DIM), dtype=np.uint16)
        self.reg = self.engine.register(self.client, self.kv)
        shape = (16, self.LAYERS, 2, self.TOKENS, self.HEADS, self.DIM)
        self.pool = self.engine.alloc_host(self.client, int(np.prod(shape)) * 2)
        self.host = self.pool.numpy(np.uint16, shape)
        self.gpu_side, self.host_side = self.reg.blocks(2), self.pool.blocks(self.host, 0)

    def tearDown(self):
        self.queue.close()
        self.reg.close()
        self.engine.close()

    def test_layouts(self):
        chunk = self.TOKENS * self.HEADS * self.DIM * 2
        self.assertEqual(self.gpu_side.chunks, self.LAYERS * 2)
        self.assertEqual(self.gpu_side.chunk_bytes, chunk)
        self.assertEqual(self.gpu_side.chunk_stride, 32 * chunk)  # one (layer, k/v) plane
        self.assertEqual(self.gpu_side.block_stride, chunk)
        self.assertFalse(self.gpu_side.contiguous)
        self.assertTrue(self.host_side.contiguous)
        self.assertEqual(self.host_side.block_bytes, self.gpu_side.block_bytes)
        # A view inside the registration: its offset in the region.
        later = self.reg.blocks(2, self.kv[:, :, 8:])
        self.assertEqual(later.offset, 8 * chunk)
        self.assertEqual(later.num_blocks, 24)

    def test_one_strided_descriptor_per_block(self):
        descs = ferry.block_descriptors(self.gpu_side, self.host_side, [3, 9], [0, 5], tag=40)
        self.assertEqual(len(descs), 2)
        self.assertEqual(descs["tag"].tolist(), [40, 41])
        self.assertTrue((descs["flags"] == ferry.FLAG_STRIDED).all())
        self.assertTrue((descs["count"] == self.LAYERS * 2).all())
        chunk = self.gpu_side.chunk_bytes
        self.assertEqual(descs["src_offset"].tolist(), [3 * chunk, 9 * chunk])
        self.assertEqual(descs["dst_offset"].tolist(), [0, 5 * self.host_side.block_bytes])
        self.assertTrue((descs["src_stride"] == 32 * chunk).all() and (descs["dst_stride"] == chunk).all())
        # Two contiguous sides: one plain descriptor of the whole block.
        plain = ferry.block_descriptors(self.host_side, self.host_side, [1], [2])
        self.assertEqual((plain["flags"][0], plain["count"][0], plain["len"][0]), (0, 0, self.host_side.block_bytes))

    def test_offload_and_load_back_byte_for_byte(self):
        rng = np.random.default_rng(9)
        src_ids = rng.choice(32, 12, replace=False)
        dst_ids = rng.choice(16, 12, replace=False)
        self.assertEqual(self.queue.copy_blocks(self.gpu_side, self.host_side, src_ids, dst_ids), 12)
        for s, d in zip(src_ids, dst_ids):
            self.assertTrue(np.array_equal(self.host[d], self.kv[:, :, s]), f"block {s} -> {d}")
        # Load them back to other blocks (poisoned first).
        back_ids = np.setdiff1d(np.arange(32), src_ids)[:12]
        self.kv[:, :, back_ids] = 0xDEAD
        self.queue.copy_blocks(self.host_side, self.gpu_side, dst_ids, back_ids)
        for d, b in zip(dst_ids, back_ids):
            self.assertTrue(np.array_equal(self.kv[:, :, b], self.host[d]), f"block {d} -> {b}")

    def test_per_layer_tensors(self):
        """vLLM's per-layer layout [2, num_blocks, ...]: block_dim 1, two chunks per block."""
        layer = np.ascontiguousarray(self.kv[1])
        with self.engine.register(self.client, layer) as reg:
            side = reg.blocks(1)
            self.assertEqual(side.chunks, 2)
            pool = self.engine.alloc_host(self.client, 8 * side.block_bytes)
            host = pool.numpy(np.uint16, (8, 2, self.TOKENS, self.HEADS, self.DIM))
            self.queue.copy_blocks(side, pool.blocks(host, 0), [31, 0], [7, 2])
            self.assertTrue(np.array_equal(host[7], layer[:, 31]) and np.array_equal(host[2], layer[:, 0]))

    def test_bad_block_requests_are_clear_errors(self):
        g, h = self.gpu_side, self.host_side
        with self.assertRaisesRegex(ValueError, r"dst_block_ids\[1\] = 16 is not a block id"):
            ferry.block_descriptors(g, h, [0, 1], [0, 16])
        with self.assertRaisesRegex(ValueError, "src_block_ids.*-1"):
            ferry.block_descriptors(g, h, [-1], [0])
        with self.assertRaisesRegex(ValueError, "2 source block ids but 1"):
            ferry.block_descriptors(g, h, [0, 1], [0])
        with self.assertRaisesRegex(ValueError, "appears twice"):
            ferry.block_descriptors(g, h, [0, 1], [3, 3])
        with self.assertRaisesRegex(TypeError, "integer block ids"):
            ferry.block_descriptors(g, h, [0.5], [0])
        half = self.pool.blocks(self.host[:, :2], 0)
        with self.assertRaisesRegex(ValueError, "bytes"):
            ferry.block_descriptors(g, half, [0], [0])
        with self.assertRaisesRegex(ValueError, "after block_dim"):
            self.reg.blocks(2, self.kv[..., ::2])
        with self.assertRaisesRegex(ValueError, "collapse"):
            self.reg.blocks(2, self.kv[::2])
        with self.assertRaisesRegex(ValueError, "outside"):
            self.pool.blocks(self.kv, 2)  # not a view of the pool
        with self.assertRaisesRegex(ValueError, "block_dim 6"):
            self.reg.blocks(6)
        many = ferry.Blocks(region=g.region, offset=0, num_blocks=1, block_stride=0, chunks=ferry.MAX_CHUNKS + 1,
                            chunk_bytes=2, chunk_stride=4)
        flat = ferry.Blocks(region=h.region, offset=0, num_blocks=1, block_stride=0, chunks=1,
                            chunk_bytes=2 * (ferry.MAX_CHUNKS + 1), chunk_stride=0)
        with self.assertRaisesRegex(ValueError, "more than one descriptor carries"):
            ferry.block_descriptors(many, flat, [0], [0])

    def test_a_failed_block_raises_copy_error(self):
        """A layout naming a region the queue's client does not own: every block fails with the
        engine's status, and the error names the first."""
        other = self.engine.new_client()
        foreign = self.engine.alloc_host(other, self.pool.size)
        theirs = foreign.blocks(foreign.numpy(np.uint16, self.host.shape), 0)
        with self.assertRaises(ferry.CopyError) as caught:
            self.queue.copy_blocks(self.gpu_side, theirs, [4, 5], [1, 2])
        self.assertEqual((caught.exception.failed, caught.exception.index, caught.exception.status), (2, 0, "not_owner"))
        self.assertIn("block 4 -> 1", str(caught.exception))
        # The queue goes on.
        self.queue.copy_blocks(self.gpu_side, self.host_side, [4], [1])
        self.assertTrue(np.array_equal(self.host[1], self.kv[:, :, 4]))


class GpuBlocks(unittest.TestCase):
    def test_torch_cuda_kv_blocks_round_trip(self):
        """A torch CUDA KV cache registered directly, blocks offloaded to a ferry host buffer seen
        as a torch tensor and loaded back, checked against torch indexing."""
        torch = torch_or_skip(cuda=True)
        with ferry.Engine(transport="gpu", pinned=False) as engine:
            client = engine.new_client()
            kv = torch.randn(8, 2, 64, 16, 4, 32, device="cuda").to(torch.bfloat16)
            torch.cuda.synchronize()  # ferry's copies are not ordered with torch's stream
            reg = engine.register(client, kv)
            pool = engine.alloc_host(client, 32 * kv[:, :, 0].numel() * 2)
            host = pool.torch(torch.bfloat16, (32, 8, 2, 16, 4, 32))
            queue = engine.open_queue(client)
            src = torch.randperm(64)[:20]
            dst = torch.randperm(32)[:20]
            queue.copy_blocks(reg.blocks(2), pool.blocks(host, 0), src, dst)
            self.assertTrue(torch.equal(host[dst], kv[:, :, src].permute(2, 0, 1, 3, 4, 5).cpu()))
            back = torch.randperm(64)[:20]
            kv[:, :, back] = 0
            torch.cuda.synchronize()
            queue.copy_blocks(pool.blocks(host, 0), reg.blocks(2), dst, back)
            torch.cuda.synchronize()
            self.assertTrue(torch.equal(kv[:, :, back].permute(2, 0, 1, 3, 4, 5).cpu(), host[dst]))
            queue.close()
            reg.close()


if __name__ == "__main__":
    unittest.main()
