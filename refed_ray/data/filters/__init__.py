"""Filters over a run's committed samples (``base.Filter``; ``dedup.py``); ``data/kept.py`` applies the
ones in force (``RUN_FILTERS``). A new run filter is one module here and one entry there."""
