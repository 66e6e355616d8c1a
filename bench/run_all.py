"""Every CPU benchmark, one command, one report (8.5 minutes on 2 cores, 2026-11-27):

    .venv/bin/python -m bench.run_all

Prints the machine, then the throughput, fixed-cost, Tune and memory tables, and writes the same text to
bench/results/latest.md, ready for docs/BENCHMARKS.md. Run it on an otherwise idle machine: the
ratios compare contenders measured in the same run, but absolute numbers move with the load.
"""

from __future__ import annotations

import datetime as dt

import ray

from bench import fixed_costs, memory, throughput, tune_overhead
from bench.common import RESULTS_DIR, machine_description


def main() -> None:
    header = f"# Benchmarks, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n```\n{machine_description()}\n```\n"
    print(header, flush=True)
    sections = [header, throughput.main([])]
    ray.shutdown()  # the fixed-cost runs start their own Ray; an idle one must not sit beside them
    sections.append(fixed_costs.main(["--repeat", "1"]))
    sections.append(tune_overhead.main([]))  # each search in its own interpreter, with its own Ray
    sections.append(memory.main([]))  # each worker in its own interpreter: peak RSS vs the data's size
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text("\n\n".join(sections) + "\n")
    print(f"\nwritten to {RESULTS_DIR / 'latest.md'}")


if __name__ == "__main__":
    main()
