"""Evaluation: the exact detector, the GenEval-style benchmark, and the bias/diversity probe."""
