#!/usr/bin/env python3
"""Tests of benchlib's bookkeeping (no server, no network): a chart is claimed only once
written, matplotlib installed on first use is imported in the same run, results directories
are never reused, and a run too small to conclude says so. Run: python3 scripts/benchlib_test.py
(tests/newcomer.rs runs it)."""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as b  # noqa: E402


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


class Pyplot(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.env = mock.patch.dict(os.environ, {"CARGO_TARGET_DIR": self.tmp.name})
        self.env.start()
        self.path = list(sys.path)

    def tearDown(self):
        self.env.stop()
        sys.path[:] = self.path
        for m in ("matplotlib", "matplotlib.pyplot"):
            sys.modules.pop(m, None)
        self.tmp.cleanup()

    @unittest.skipIf(have_matplotlib(), "matplotlib is already importable here")
    def test_what_pip_installs_on_first_use_is_imported_in_the_same_run(self):
        def fake_pip(argv, **_):
            # What `pip install --target DIR matplotlib` leaves: a package in DIR.
            pkg = Path(argv[argv.index("--target") + 1]) / "matplotlib"
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text("def use(backend):\n    pass\n")
            (pkg / "pyplot.py").write_text("FAKE = True\n")
            return subprocess.CompletedProcess(argv, 0)

        with mock.patch.object(b.subprocess, "run", side_effect=fake_pip) as pip:
            plt = b.pyplot()
        self.assertEqual(pip.call_count, 1)
        self.assertTrue(plt.FAKE)
        self.assertTrue(plt.__file__.startswith(self.tmp.name), plt.__file__)

    @unittest.skipIf(have_matplotlib(), "matplotlib is already importable here")
    def test_a_failed_install_is_an_import_error_and_no_chart_is_claimed(self):
        failed = subprocess.CompletedProcess([], 1)
        with mock.patch.object(b.subprocess, "run", return_value=failed):
            with self.assertRaisesRegex(ImportError, "could not install matplotlib"):
                b.pyplot()
            chart = Path(self.tmp.name) / "chart.png"
            self.assertFalse(b.write_chart(lambda p: b.pyplot(), chart))
        self.assertFalse(chart.exists())


class Charts(unittest.TestCase):
    def test_a_chart_is_claimed_only_if_its_file_exists(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "chart.png"
            self.assertFalse(b.write_chart(lambda p: None, path))
            self.assertTrue(b.write_chart(lambda p: Path(p).write_bytes(b"png"), path))


class Results(unittest.TestCase):
    def test_two_runs_never_share_a_directory_and_out_is_never_overwritten(self):
        with tempfile.TemporaryDirectory() as d, mock.patch.object(b, "RESULTS", Path(d) / "results"):
            first, second = b.results_dir("x"), b.results_dir("x")
            self.assertNotEqual(first, second)
            self.assertTrue(first.name.endswith("-x") and second.name.startswith(first.name))
            (first / "results.md").write_text("kept")
            with self.assertRaises(SystemExit):
                b.results_dir("x", out=first)
            self.assertEqual((first / "results.md").read_text(), "kept")
            empty = Path(d) / "new" / "dir"
            self.assertEqual(b.results_dir("x", out=empty), empty)


class Honesty(unittest.TestCase):
    def test_too_few_rounds_or_seconds_say_so_and_the_spread_is_quoted(self):
        lines = b.honesty(3, 3.0, {"a": [19000, 27000, 100000], "b": [10, 10, None]})
        self.assertIn("a 0.70-3.70x", lines[0])
        self.assertIn("TOO SMALL TO CONCLUDE: 3 round(s) of 3 s", lines[1])
        self.assertIn("TOO SMALL", b.honesty(9, 1.0, {})[0])
        self.assertEqual(b.honesty(5, 3.0, {}), [])
        self.assertIn("1 round(s). ", b.honesty(1, None, {})[0])
        self.assertIn("use at least --rounds 5 and", b.honesty(1, None, {})[0])


if __name__ == "__main__":
    unittest.main()
