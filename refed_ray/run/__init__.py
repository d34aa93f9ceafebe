"""The run: ``pipeline.py`` tells its story (preflight, plan, passes, filters, top-up, dataset,
report); ``passes.py`` runs every pass (one engine actor pool, one Ray block per shard, drain,
index); ``workers.py`` are the engine actors; ``reserve.py`` runs most of a top-up inside the synthesis
pass (reserve shards at its end, run as the yield asks); ``output.py`` starts, resumes or refuses OUTPUT;
``instructions_from.py`` reuses an earlier run's instructions; ``progress.py`` is the driver's
progress line; ``restart_warning.py`` explains one Ray warning.

May import: reports, data, method, config, engines, records, storage, errors. Not the commands
that watch a run (watch/) or experiment on its output (experiments/).
"""
