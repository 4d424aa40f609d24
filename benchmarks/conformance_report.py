"""Worst observed difference vs its bound, per conformance check, fixture set and thread count.

Runs the conformance tests (every set under ../shared/fixtures plus those in VARGPT_FIXTURE_DIRS, 1 and 2 torch
threads) and tabulates the properties they record (worst |diff| and the bound, the bf16-envelope numbers):

    VARGPT_FIXTURE_DIRS=/tmp/fx/seed11:/tmp/fx/seed23 python benchmarks/conformance_report.py [--md out.md]

Extra sets come from ../shared/official-harness/make_fixtures.py OUT --seed S (see its README).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_visual_decoder.py", "tests/test_vargpt.py", "tests/test_vlm.py", "tests/test_vae.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", type=Path, help="also write the table as markdown here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fixture",
                              f"--junitxml={xml}", *TESTS], cwd=ROOT)
        rows = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            for prop in case.iter("property"):
                name = case.get("name")
                params = name[name.index("[") + 1:-1] if "[" in name else ""
                rows.append((prop.get("name"), params, prop.get("value"), "FAIL" if failed else "ok"))
    rows.sort()
    lines = ["| check | fixture set - threads | observed (vs bound) | |", "|---|---|---|---|"]
    lines += [f"| {c} | {p} | {v} | {s} |" for c, p, v, s in rows]
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
