"""Filters over a run's committed samples (``base.Filter``); ``kept.py`` applies the ones in force."""
