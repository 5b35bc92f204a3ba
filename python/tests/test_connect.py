"""An engine in a `ferry serve` daemon, from Python: `ferry.connect(socket)` takes the same calls
as an engine started here (host transport), refuses what it cannot do with a clear error, and a
daemon that dies makes the queue's polls raise engine_gone, never hang; on a GPU, a daemon on the
CUDA transport moves blocks of this process's torch tensor, shared by CUDA IPC. Needs the
`ferry` binary: FERRY_BIN, or `ferry` on PATH (SKIP otherwise)."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import numpy as np

import ferry
from support import torch_or_skip


def ferry_binary():
    path = os.environ.get("FERRY_BIN") or shutil.which("ferry")
    if not path or not os.access(path, os.X_OK):
        print("SKIP: no ferry binary (set FERRY_BIN or put ferry on PATH): the daemon tests did not run")
        raise unittest.SkipTest("no ferry binary")
    return path


class Daemon(unittest.TestCase):
    """Starts `ferry serve` on the TRANSPORT below and connects `self.engine` to it."""

    TRANSPORT = "host"
    FLAGS: list = []

    def setUp(self):
        binary = ferry_binary()
        self.dir = tempfile.mkdtemp(prefix="ferry-py-serve-")
        self.socket = os.path.join(self.dir, "s.sock")
        self.daemon = subprocess.Popen([binary, "serve", "--socket", self.socket, "--transport", self.TRANSPORT,
                                        "--unpinned", "--quiet"] + self.FLAGS)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.engine = ferry.connect(self.socket)
                break
            except ferry.FerryError:
                if time.monotonic() > deadline or self.daemon.poll() is not None:
                    raise
                time.sleep(0.01)

    def tearDown(self):
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.assertEqual(self.daemon.wait(timeout=10), 0)
        shutil.rmtree(self.dir, ignore_errors=True)


class Connected(Daemon):
    def test_the_same_calls_as_an_engine_started_here(self):
        engine = self.engine
        self.assertEqual(engine.transport, "daemon")
        client = engine.new_client()
        src, dst = engine.alloc_host(client, 1 << 16), engine.alloc_host(client, 1 << 16)
        src.numpy()[:4096] = np.arange(4096, dtype=np.uint32).astype(np.uint8)
        queue = engine.open_queue(client)
        descs = ferry.descriptors(4)
        for i in range(4):
            descs[i]["tag"], descs[i]["src_region"], descs[i]["dst_region"] = i, src.region, dst.region
            descs[i]["src_offset"], descs[i]["dst_offset"], descs[i]["len"] = i * 1024, 8192 + i * 1024, 1024
        done = queue.run(descs)
        self.assertEqual(done["status"].tolist(), [0, 0, 0, 0])
        self.assertTrue(np.array_equal(dst.numpy()[8192:12288], src.numpy()[:4096]))
        # Blocks too: a paged layout in daemon memory.
        kv = src.numpy(np.uint8, (4, 2, 8, 1024))
        pool = dst.numpy(np.uint8, (8, 4, 2, 1024))
        moved = queue.copy_blocks(src.blocks(kv, 2), dst.blocks(pool, 0), [1, 5], [0, 3])
        self.assertEqual(moved, 2)
        self.assertTrue(np.array_equal(pool[3], kv[:, :, 5]))
        # What it cannot do: a clear error.
        with self.assertRaises(ferry.FerryError) as caught:
            engine.register(client, np.zeros(4096, dtype=np.uint8))
        self.assertEqual(caught.exception.code, ferry.RESULT["invalid_argument"])
        self.assertIn("not available on an engine connected", str(caught.exception))
        with self.assertRaises(ferry.FerryError):
            engine.set_sm_budget(ferry.SM_BUDGET_NONE)
        queue.close()
        engine.close()

    def test_replicas_share_a_pool(self):
        other = ferry.connect(self.socket)
        a, b = self.engine.shared_client("replicas"), other.shared_client("replicas")
        self.assertEqual(a, b)
        pool = self.engine.alloc_host(a, 1 << 16)
        pool.numpy()[:4] = [1, 2, 3, 4]
        seen = other.map_host(b, pool.region)
        self.assertEqual(seen.numpy()[:4].tolist(), [1, 2, 3, 4])
        self.assertEqual(len(seen.numpy()), 1 << 16)
        with self.assertRaises(ferry.FerryError):
            other.map_host(other.new_client(), pool.region)  # not that client's
        local = ferry.Engine(pinned=False)
        self.assertEqual(local.shared_client("p"), local.shared_client("p"))
        with self.assertRaises(ferry.FerryError):
            local.map_host(local.shared_client("p"), 1)
        local.close()
        other.close()

    def test_a_memfd_of_this_process_is_registered_by_the_daemon(self):
        import fcntl
        import mmap
        client = self.engine.new_client()
        fd = os.memfd_create("py-pool", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 1 << 16)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mine = mmap.mmap(fd, 1 << 16)
            mine[:6] = b"shared"
            buffer = self.engine.register_memfd(client, fd)
            self.assertEqual(len(buffer.numpy()), 1 << 16)
            queue = self.engine.open_queue(client)
            queue.submit([ferry.Descriptor(src_region=buffer.region, dst_region=buffer.region, dst_offset=4096, len=6)])
            (done,) = queue.wait(1)
            self.assertEqual(done.status_name, "ok")
            self.assertEqual(mine[4096:4102], b"shared")
            queue.close()
            mine.close()
        finally:
            os.close(fd)
        with self.assertRaises(ferry.FerryError):
            self.engine.register_memfd(client, 999)  # not a descriptor

    def test_a_daemon_that_dies_is_engine_gone_not_a_hang(self):
        client = self.engine.new_client()
        buf = self.engine.alloc_host(client, 1 << 16)
        queue = self.engine.open_queue(client)
        self.daemon.kill()
        self.daemon.wait()
        out = ferry.completions(4)
        killed = time.monotonic()
        with self.assertRaises(ferry.FerryError) as caught:
            queue.wait_into(out, 1, timeout=5)
        self.assertEqual(caught.exception.code, ferry.RESULT["engine_gone"])
        self.assertLess(time.monotonic() - killed, 2)
        del buf

    def test_no_daemon_is_a_clear_error(self):
        with self.assertRaises(ferry.FerryError) as caught:
            ferry.connect(os.path.join(self.dir, "none.sock"))
        self.assertEqual(caught.exception.code, ferry.RESULT["system_error"])
        self.assertIn("connecting to the daemon", str(caught.exception))


class ConnectedCuda(Daemon):
    """A daemon on the CUDA transport: this process's torch CUDA tensor goes to it by CUDA IPC
    (`Engine.register` as in-process) and paged KV blocks move both ways between it and host
    memory the daemon allocated (pinned). SKIP without torch and a CUDA device."""

    TRANSPORT = "cuda"

    def setUp(self):
        self.torch = torch_or_skip(cuda=True)
        super().setUp()

    def test_a_torch_tensor_shared_by_cuda_ipc_moves_both_ways(self):
        torch = self.torch
        client = self.engine.new_client()
        layers, blocks, tokens, heads, dim = 4, 64, 16, 8, 64   # a block: 4 x 2 chunks of 16 KiB
        kv = torch.randn((layers, 2, blocks, tokens, heads, dim), device="cuda", dtype=torch.float16)
        reg = self.engine.register(client, kv)
        block_bytes = layers * 2 * tokens * heads * dim * 2
        host = self.engine.alloc_host(client, 32 * block_bytes)
        pool = host.torch(torch.float16, (32, layers, 2, tokens, heads, dim))
        pool.fill_(-1.0)
        queue = self.engine.open_queue(client)
        gpu_ids, host_ids = list(range(1, 64, 2)), list(range(31, -1, -1))
        torch.cuda.synchronize()
        self.assertEqual(queue.copy_blocks(reg.blocks(2), host.blocks(pool, 0), gpu_ids, host_ids), 32)
        for g, h in zip(gpu_ids, host_ids):
            self.assertTrue(torch.equal(pool[h], kv[:, :, g].cpu()), f"offloaded block {g} -> {h}")
        kv.zero_()
        torch.cuda.synchronize()
        self.assertEqual(queue.copy_blocks(host.blocks(pool, 0), reg.blocks(2), host_ids, gpu_ids), 32)
        for g, h in zip(gpu_ids, host_ids):
            self.assertTrue(torch.equal(kv[:, :, g].cpu(), pool[h]), f"loaded block {h} -> {g}")
        self.assertEqual(int(kv[:, :, 0].abs().sum()), 0, "a block not loaded stays zero")
        reg.close()
        queue.close()
        self.engine.close()


class ConnectedAllGpus(ConnectedCuda):
    """The same through a daemon driving every GPU of the machine (`--all-gpus`)."""

    FLAGS = ["--all-gpus"]


if __name__ == "__main__":
    unittest.main()
