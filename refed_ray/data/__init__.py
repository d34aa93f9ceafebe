"""The data a run reads and delivers: the reference set, the samples kept, the dataset, exports.

``seeds.py`` reads the reference set; ``filters/`` (``base.Filter``; ``dedup.py``, the run's
near-duplicate filter) commit their drops; ``kept.py`` computes the samples kept (committed less
the drops of the filters in force) for everyone who counts them; ``dataset.py`` compacts them into
OUTPUT/dataset/ generations, ``card.py`` writes its card; ``selected.py`` is where selections live;
``export.py`` writes the training formats; ``quality.py`` measures diversity and lengths.

May import: method (what a near-duplicate is), config, records, storage, errors. Not the run,
its reports or the commands around it.
"""
