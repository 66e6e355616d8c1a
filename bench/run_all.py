"""Every CPU benchmark, one command, one report (8 min 53 s on 2 cores, 2026-12-04):

    .venv/bin/python -m bench.run_all

Prints the machine, then the throughput (with train.compile), fixed-cost, scale (1x and 4x; `bench.scale`
alone adds 16x), Tune and memory tables, and at the end every ratio they measured, one line each, and what
each benchmark took; writes the same text to bench/results/latest.md, ready for docs/BENCHMARKS.md. Each runs
trimmed to what its ratios need (one repeat, three for the fixed costs, fewer contenders); alone, each measures more. Run it on an
otherwise idle machine: the ratios compare contenders measured in the same run, but absolute numbers move
with the load.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import ray

from bench import fixed_costs, memory, scale, throughput, tune_overhead
from bench.common import RATIO_MARK, RESULTS_DIR, machine_description


def main() -> None:
    header = f"# Benchmarks, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n```\n{machine_description()}\n```\n"
    print(header, flush=True)
    took: dict[str, float] = {}

    def run(name: str, bench: Callable[[list[str]], str], argv: list[str]) -> str:
        started = time.monotonic()
        text = bench(argv)
        took[name] = time.monotonic() - started
        return text

    # Trimmed to what the ratios need, to stay within about 10 minutes; each module alone measures more.
    sections = [header, run("throughput", throughput.main, ["--repeats", "1", "--ratios-only"])]
    ray.shutdown()  # the later benchmarks start their own Ray, each in its own interpreter: an idle one must not sit beside them
    sections.append(run("fixed costs", fixed_costs.main, ["--repeat", "3", "--ratio-only"]))  # one round moved by 0.15x
    sections.append(run("scale", scale.main, ["--factors", "1", "4"]))
    sections.append(run("Tune", tune_overhead.main, ["--worker-trials", "2"]))
    sections.append(run("memory", memory.main, ["--quick"]))
    sections.append(summary(sections, took))
    print("\n" + sections[-1])
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text("\n\n".join(sections) + "\n")
    print(f"\nwritten to {RESULTS_DIR / 'latest.md'}")


def summary(sections: list[str], took: dict[str, float]) -> str:
    """Every ratio the reports above measured, one line each, and what each benchmark took."""
    ratios = [line for section in sections for line in section.splitlines() if line.startswith(RATIO_MARK)]
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items())
    return "\n".join(["## Every ratio above", "", *ratios, "", f"Took {sum(took.values()):.0f} s: {times}."])


if __name__ == "__main__":
    main()
