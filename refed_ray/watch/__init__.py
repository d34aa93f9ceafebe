"""Commands that look at a run without running one: ``refed-ray plan`` (``estimate.py``: what a run
will do and cost, with ``sizing.py``'s GPU model) and ``refed-ray status`` (``status.py``).

May import: the run's layer (its preflight and progress figures) and everything below it.
"""
