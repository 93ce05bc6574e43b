"""Refit's benchmarks: the model, preprocessing, the in-process limit, the served API and retraining.

    make bench                              # everything; writes bench/results/ and docs/benchmarks.md
    python -m bench.run --quick             # tiny counts, a smoke test (results under bench/results/quick/)
    python -m bench.run --only served       # one benchmark; the page is rebuilt from the saved results
"""
