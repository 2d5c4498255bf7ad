"""msrbench: `just bench` (`python -m msrbench.run`), the side-by-side Envoy benchmark.

- run.py: the phases (cost, profile, latency, burst, memory) and the command line
- configs.py: the Envoy configurations of every variant, from envoy.yaml's own listener options
- envoy.py: one bench Envoy pinned to a core, started by msrtest.procs.Children
- noop_wasm.py: the hand-made no-op module with the filter's exports
- report.py, plot.py: BENCHMARKS.md and bench/benchmarks.svg

`just bench-synapse` (`python -m msrbench.synapse_bench`), what routing by user saves Synapse:

- synapse_bench.py: user vs token vs round robin on real sync workers (msrtest.workers), the
  rounds and windows, Synapse's metrics and PostgreSQL's counters, the command line
- synapse_load.py: the users, devices and rooms, and the long-polling clients (aiohttp)
- synapse_report.py: its section of BENCHMARKS.md (which `just bench` keeps) and bench/synapse.svg

Real Synapse, process supervision and the HTTP client come from msrtest.
"""


class BenchError(Exception):
    """The bench cannot run or a measurement is not valid (the message says why)."""
