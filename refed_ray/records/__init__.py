"""What is read and written, and how a write counts as done: the bottom of the house.

``models.py``: pydantic models of every record (references, work units, teacher replies, samples,
rejects) and their Arrow schemas; ``stages.py``: stage and pass names as data; ``stats.py``: the
counters a shard commits; ``commits.py``: the commit protocol (markers, index, run id, attempts,
the driver's own commits); ``plan.py``: work units cut into shards, written before synthesis.

May import: storage, errors. Nothing above (no config, engine, method or Ray).
"""
