"""Tests of the Python binding: `python3 -m unittest discover -s python` (needs libferry.so)."""

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


if __name__ == "__main__":
    unittest.main()
