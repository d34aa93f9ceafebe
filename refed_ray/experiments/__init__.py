"""The paper's comparisons on a run's output: ``refed-ray compare`` (``compare.py``), the judge's
pass (``judge_pass.py``), and ``refed-ray select`` (``select.py``) with its methods in
``selections/`` (judge, rougel, random; a new selection is a module there and one entry in
``select.METHODS``).

May import: everything below it (watch, run, reports, data, ...); only the CLI imports it.
"""
