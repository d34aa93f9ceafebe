"""Teacher engines: the ``Engine`` interface (``base.py``), the engine section of the config
(``config.py``), the registry of kinds (``kinds.py``: a new kind is its module and one ``register``
call), the in-process vLLM engine, the OpenAI-compatible API engine, the embedded default model and
the guard a worker puts around its engine.

May import: records, storage, errors. Not the run's config, the method or the run.
"""
