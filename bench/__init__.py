"""Benchmark harness: batchinf against a bare model, tf.data and a plain Ray Data pipeline.

Run ``python -m bench.run --help``; see ``bench/README.md``.
"""
