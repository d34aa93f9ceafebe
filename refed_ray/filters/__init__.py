"""Filters: each decides, per committed sample, keep or drop with a reason (pure, deterministic)."""
