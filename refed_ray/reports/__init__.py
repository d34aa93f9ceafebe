"""What a person reads after a run: report.json (``report.py``), report.html (``page.py``) and the
terminal summary and views (``views.py``). The run writes them at its end; ``refed-ray report``
writes them again.

May import: data, method, config, records, storage, errors. Not the run.
"""
