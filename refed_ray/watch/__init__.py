"""Commands that look at a run without running one: ``refed-ray plan`` (``estimate.py``: what a run
will do and cost, with ``sizing.py``'s GPU model), ``refed-ray doctor`` (``doctor.py``: on the
cluster the run would use, what would fail it later) and ``refed-ray status`` (``status.py``).

May import: the run's layer (its preflight and progress figures) and everything below it.
"""
