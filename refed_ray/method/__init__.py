"""The method: what the paper describes, as plain async functions over an ``Engine``.

Prompts (``prompts.py``, the files in prompts/), one structured call (``structured.py``), the four
stages (``feedback``, ``instructions``, ``responses``, ``refinement``), the feedback modes' refiners
(``refined.Refiner``; ``refiners.REFINERS``: reference in ``refinement.py``, sample in
``sample_feedback.py``, none), a unit's chain (``synthesis.py``), what a near-duplicate instruction
is (``similarity.py``) and the pairwise judge (``judge.py``).

May import: config, engines (the ``Engine`` interface), records, errors. Never Ray, storage or the
run: a step knows nothing of shards, actors or where its output goes.
"""
