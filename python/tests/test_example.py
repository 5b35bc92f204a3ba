"""examples/kv_offload_server.py runs on the host transport: offloads, evictions, and prefix hits
whose loaded blocks it checks (it exits nonzero on a wrong block)."""

import pathlib
import re
import subprocess
import sys
import unittest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "kv_offload_server.py"


class ExampleTest(unittest.TestCase):
    def test_the_server_loop_offloads_evicts_and_loads_back(self):
        # -P: the example imports the same ferry package as this test (not a copy beside it).
        run = subprocess.run([sys.executable, "-P", str(EXAMPLE), "--transport", "host", "--requests", "300"],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 0, run.stderr)
        counts = dict((k.strip(), int(v)) for k, v in re.findall(r"([a-z ]+?) (\d+)(?:,|$)", run.stdout.split(";", 1)[1]))
        for key in ("blocks offloaded", "blocks loaded", "evicted", "prefix hits", "prefix misses"):
            self.assertGreater(counts.get(key, 0), 0, f"{key}: {run.stdout}")


if __name__ == "__main__":
    unittest.main()
