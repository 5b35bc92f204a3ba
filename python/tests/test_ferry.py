"""Tests of the Python package: `python -m unittest discover -s .` from python/tests, against the
installed package (`pip install ./python`) or with FERRY_LIB naming libferry.so."""

import os
import time
import random
import unittest

import ferry


class FerryTest(unittest.TestCase):
    def setUp(self):
        self.engine = ferry.Engine(pinned=False)
        self.client = self.engine.new_client()

    def tearDown(self):
        self.engine.close()

    def test_scattered_copies_arrive(self):
        size = 1 << 20
        src, dst = self.engine.alloc_host(self.client, size), self.engine.alloc_host(self.client, size)
        rng = random.Random(7)
        payload = bytes(rng.getrandbits(8) for _ in range(size))
        src.view()[:] = payload
        queue = self.engine.open_queue(self.client)
        order = list(range(256))
        rng.shuffle(order)
        descs = [
            ferry.Descriptor(tag=i, src_region=src.region, dst_region=dst.region, src_offset=slot * 4096, dst_offset=i * 4096, len=4096)
            for i, slot in enumerate(order)
        ]
        self.assertEqual(queue.submit(descs), len(descs))
        done = queue.wait(len(descs))
        self.assertEqual([c.tag for c in done], list(range(len(descs))))
        self.assertTrue(all(c.status_name == "ok" and c.bytes == 4096 for c in done))
        view = dst.view()
        for i, slot in enumerate(order):
            self.assertEqual(bytes(view[i * 4096 : (i + 1) * 4096]), payload[slot * 4096 : (slot + 1) * 4096])
        self.assertEqual(queue.watermark, len(descs))
        queue.close()

    def test_bad_descriptor_and_errors(self):
        buf = self.engine.alloc_host(self.client, 4096)
        queue = self.engine.open_queue(self.client)
        queue.submit([ferry.Descriptor(tag=9, src_region=buf.region, dst_region=buf.region, len=0)])
        (done,) = queue.wait(1)
        self.assertEqual((done.tag, done.status_name), (9, "zero_length"))
        with self.assertRaises(ferry.FerryError) as caught:
            self.engine.deregister(0xDEAD0000)
        self.assertIn("not registered", str(caught.exception))
        with self.assertRaises(ferry.FerryError):
            self.engine.open_queue(self.client, submit_capacity=1000)  # not a power of two

    def test_transport_text_and_worker_stats(self):
        self.assertEqual(self.engine.transport, "host")
        buf = self.engine.alloc_host(self.client, 8192)
        queue = self.engine.open_queue(self.client)
        queue.submit([ferry.Descriptor(tag=1, src_region=buf.region, dst_region=buf.region, dst_offset=4096, len=64)])
        queue.wait(1)
        stats = self.engine.stats(0)
        self.assertGreaterEqual(stats.descriptors, 1)
        self.assertEqual(stats.nic, 0)
        with self.assertRaises(ferry.FerryError):
            self.engine.stats(5)  # no such worker

    def test_one_strided_descriptor_moves_a_paged_block(self):
        """FLAG_STRIDED: 8 chunks of 512 bytes, 4 KiB apart at the source and 1 KiB at the
        destination, in one descriptor with one completion."""
        src, dst = self.engine.alloc_host(self.client, 1 << 16), self.engine.alloc_host(self.client, 1 << 16)
        data = os.urandom(1 << 16)
        src.view()[:] = data
        queue = self.engine.open_queue(self.client)
        queue.submit([ferry.Descriptor(tag=5, src_region=src.region, dst_region=dst.region, len=512,
                                       flags=ferry.FLAG_STRIDED, count=8, src_stride=4096, dst_stride=1024)])
        (done,) = queue.wait(1)
        self.assertEqual((done.tag, done.status_name, done.bytes), (5, "ok", 8 * 512))
        for i in range(8):
            self.assertEqual(bytes(dst.view()[i * 1024 : i * 1024 + 512]), data[i * 4096 : i * 4096 + 512])
        # Zero chunks is its own status.
        queue.submit([ferry.Descriptor(tag=6, src_region=src.region, dst_region=dst.region, len=512,
                                       flags=ferry.FLAG_STRIDED, count=0, src_stride=4096, dst_stride=1024)])
        (done,) = queue.wait(1)
        self.assertEqual(done.status_name, "zero_count")

    def test_hand_off_attach_and_close(self):
        """A handed-off queue is attached again (here in the same process, as another process
        would), copies through, and once closed the worker stops serving it."""
        baseline = self.engine.stats(0).queues
        buf = self.engine.alloc_host(self.client, 8192)
        buf.view()[:4] = b"ferr"
        fd = self.engine.open_queue(self.client).hand_off()
        queue = ferry.Queue.attach(fd)
        os.close(fd)
        self.assertEqual(self.engine.stats(0).queues, baseline + 1)
        queue.submit([ferry.Descriptor(tag=9, src_region=buf.region, dst_region=buf.region, dst_offset=4096, len=4)])
        (done,) = queue.wait(1)
        self.assertEqual((done.tag, done.status_name), (9, "ok"))
        self.assertEqual(bytes(buf.view()[4096:4100]), b"ferr")
        queue.close()
        deadline = time.monotonic() + 5
        while self.engine.stats(0).queues != baseline and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(self.engine.stats(0).queues, baseline)

    def test_gpu_transport(self):
        """transport="gpu" starts where a GPU or an RDMA NIC is; elsewhere the error names both."""
        try:
            engine = ferry.Engine(transport="gpu", pinned=False)
        except ferry.FerryError as e:
            self.assertIn("CUDA", str(e))
            self.assertIn("GDR", str(e))
            print(f"SKIP: no GPU transport can start here: {e}")
            return
        with engine:
            self.assertRegex(engine.transport, r"^(cuda|gdr)")
            client = engine.new_client()
            with self.assertRaises(ferry.FerryError) as caught:
                engine.register_gpu(client, 0x10, 4096)  # not device memory
            self.assertEqual(caught.exception.code, ferry.RESULT["bad_range"])
        with self.assertRaises(ferry.FerryError) as caught:
            ferry.Engine(transport="gpu", use_gdr="on", nic="ferry-no-such-nic", pinned=False)
        self.assertIn("GDR", str(caught.exception))

    def test_sm_budget_is_a_total_over_the_workers(self):
        """A budget below the number of workers fails at start; 0 (the default, 2), a budget of one
        SM per worker and SM_BUDGET_ALL start."""
        try:
            ferry.Engine(transport="gpu", use_gdr="off", pinned=False).close()
        except ferry.FerryError as e:
            print(f"SKIP: the CUDA driver's transport cannot start here: {e}")
            self.skipTest("no CUDA driver transport")
        with self.assertRaises(ferry.FerryError) as caught:
            ferry.Engine(transport="gpu", use_gdr="off", workers=2, sm_budget=1, pinned=False)
        self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])
        self.assertIn("2 workers", str(caught.exception))
        for budget in (0, 2, ferry.SM_BUDGET_ALL, ferry.SM_BUDGET_NONE):
            ferry.Engine(transport="gpu", use_gdr="off", workers=2, sm_budget=budget, pinned=False).close()
        # Live: none, a share per worker and all are taken; 0 and fewer than the workers are not.
        with ferry.Engine(transport="gpu", use_gdr="off", workers=2, pinned=False) as engine:
            for budget in (ferry.SM_BUDGET_NONE, 2, ferry.SM_BUDGET_ALL):
                engine.set_sm_budget(budget)
            for budget in (0, 1):
                with self.assertRaises(ferry.FerryError) as caught:
                    engine.set_sm_budget(budget)
                self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])

    def test_copy_engine_from_takes_a_byte_count_or_a_pair(self):
        """The auto strategy's crossover: an int or a (host to GPU, GPU to host) pair of byte
        counts starts an engine; a negative, oversized or ill-shaped one is refused before it."""
        for crossover in (0, 256 << 10, (64 << 10, 1 << 20), (0, 2**64 - 1)):
            ferry.Engine(pinned=False, copy_engine_from=crossover).close()
        for bad in (-1, 2**64, (1, 2, 3), (1,), (1, "2"), 1.5, True, None):
            with self.assertRaises(ValueError):
                ferry.Engine(pinned=False, copy_engine_from=bad)

    def test_resident_life_takes_seconds(self):
        """The resident kernel's life: a non-negative number of seconds (the host transport
        ignores it; its range, 1 ms to 1 s, is the GPU engine's check at start); others are
        refused before the engine."""
        for life in (0, 0.005, 1):
            ferry.Engine(pinned=False, resident_life=life).close()
        for bad in (-0.001, "0.01", None, True, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                ferry.Engine(pinned=False, resident_life=bad)

    def test_resident_writers_takes_a_warp_count(self):
        """The resident kernel's writer gate: a count of warps from 0 (the default) to 2**32 - 1;
        others are refused before the engine."""
        for writers in (0, 1, 16, 2**32 - 1):
            ferry.Engine(pinned=False, resident_writers=writers).close()
        for bad in (-1, 2**32, 1.5, "16", None, True):
            with self.assertRaises(ValueError):
                ferry.Engine(pinned=False, resident_writers=bad)

    def test_a_queue_on_a_gpu_the_engine_lacks_is_refused(self):
        """open_queue(gpu=g) puts a queue on GPU g's workers; a host engine counts as one GPU."""
        with ferry.Engine(pinned=False) as engine:
            client = engine.new_client()
            engine.open_queue(client, gpu=0).close()
            with self.assertRaises(ferry.FerryError) as caught:
                engine.open_queue(client, gpu=1)
            self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])
            self.assertIn("QueueConfig::gpu", str(caught.exception))

    def test_set_sm_budget_needs_the_gpu_transport(self):
        """A host engine has no copy kernel to budget: the live setting is refused, naming it."""
        with ferry.Engine(pinned=False) as engine:
            with self.assertRaises(ferry.FerryError) as caught:
                engine.set_sm_budget(8)
            self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])
            self.assertIn("SM budget", str(caught.exception))

    def test_gpu_copies_with_torch(self):
        """H2D and D2H through the C ABI between an engine buffer and a torch CUDA tensor; then the
        same on an engine over every GPU (all_gpus=True), with the tensor on the last GPU."""
        try:
            import torch
        except ImportError:
            print("SKIP: torch is not installed: the GPU copy test of the binding needs it")
            return
        if not torch.cuda.is_available():
            print("SKIP: torch sees no CUDA device")
            return
        for all_gpus in (False, True):
            device = f"cuda:{torch.cuda.device_count() - 1}" if all_gpus else "cuda"
            self._gpu_round_trip(torch, ferry.Engine(transport="gpu", pinned=False, all_gpus=all_gpus), device)

    def _gpu_round_trip(self, torch, engine, device):
        size, block = 4 << 20, 4096
        with engine:
            print(f"transport: {engine.transport}, tensor on {device}")
            client = engine.new_client()
            src, back = engine.alloc_host(client, size), engine.alloc_host(client, size)
            payload = os.urandom(size)
            src.view()[:] = payload
            back.view()[:] = b"\x5a" * size
            tensor = torch.zeros(size, dtype=torch.uint8, device=device)
            gpu = engine.register_gpu(client, tensor.data_ptr(), size)
            queue = engine.open_queue(client)
            n = size // block
            order = random.Random(3).sample(range(n), n)
            # H2D: host slot order[i] -> device slot i; then D2H: device slot i -> host slot i.
            h2d = [ferry.Descriptor(tag=i, src_region=src.region, dst_region=gpu, src_offset=order[i] * block,
                                    dst_offset=i * block, len=block) for i in range(n)]
            d2h = [ferry.Descriptor(tag=n + i, src_region=gpu, dst_region=back.region, src_offset=i * block,
                                    dst_offset=i * block, len=block) for i in range(n)]
            for batch in (h2d, d2h):
                sent, done = 0, []
                while len(done) < n:
                    sent += queue.submit(batch[sent:])
                    done.extend(queue.poll())
                self.assertEqual([c.status_name for c in done], ["ok"] * n)
            expected = b"".join(payload[order[i] * block:(order[i] + 1) * block] for i in range(n))
            self.assertEqual(bytes(tensor.cpu().numpy().tobytes()), expected)
            self.assertEqual(bytes(back.view()), expected)
            engine.deregister(gpu)
            queue.close()


if __name__ == "__main__":
    unittest.main()


class AbiVersion(unittest.TestCase):
    """The package refuses a libferry built for another C ABI (stand-in libraries built by cc)."""

    def library(self, source):
        import ctypes
        import shutil
        import subprocess
        import tempfile

        cc = shutil.which("cc")
        if cc is None:
            print("SKIP: no cc: stand-in libraries for the ABI check cannot be built")
            self.skipTest("no cc")
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "libstandin.so")
        src = os.path.join(tmp, "standin.c")
        with open(src, "w") as f:
            f.write(source)
        subprocess.run([cc, "-shared", "-fPIC", "-o", path, src], check=True)
        return ctypes.CDLL(path), path

    def test_the_loaded_library_speaks_the_packages_abi(self):
        lib = ferry._library()
        self.assertEqual(lib.ferry_abi_version(), ferry.ABI_VERSION)

    def test_another_version_is_refused_with_both_versions_named(self):
        lib, path = self.library("unsigned ferry_abi_version(void) { return 999; }\n")
        with self.assertRaises(ferry.FerryError) as caught:
            ferry._check_abi(lib, path)
        self.assertIn("C ABI version 999", str(caught.exception))
        self.assertIn(f"needs version {ferry.ABI_VERSION}", str(caught.exception))
        self.assertIn(path, str(caught.exception))

    def test_a_library_without_a_version_is_refused(self):
        lib, path = self.library("int unrelated(void) { return 0; }\n")
        with self.assertRaises(ferry.FerryError) as caught:
            ferry._check_abi(lib, path)
        self.assertIn("no ferry_abi_version", str(caught.exception))
