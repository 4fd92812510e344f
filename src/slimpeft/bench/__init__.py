"""Benchmarks: speed (layer, masking, model), forgetting, encoder. Each writes JSON and prints a table."""
