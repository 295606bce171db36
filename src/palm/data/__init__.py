"""Corpora to training batches: reading documents (text, JSONL, Parquet, Arrow, compressed), sampling
and mixing them, tokenizing them into shards with worker processes, task datasets, synthetic data.

May import: core, text.
"""
