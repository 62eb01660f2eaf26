"""Digits MLP 64-64-10 trained with Adam: the task of ``bench/bench_inline.py``."""
