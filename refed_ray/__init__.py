"""refed-ray: Reference-Level Feedback synthesis on Ray Data and vLLM.

Packages by concern, each importing only the ones below it (pyproject.toml's import-linter
contracts, checked by ``make test``)::

    cli.py          the refed-ray command
    experiments/    compare, the judge's pass, select and its selection methods
    watch/          refed-ray plan, doctor and status: a run (or its cluster) looked at, not run
    run/            the pipeline, its passes, engine actors, OUTPUT's lifecycle, progress line
    reports/        report.json, report.html, the terminal views a run ends with
    data/           seeds, filters, samples kept, the dataset and its card, selections, export
    method/         the paper's method: prompts, structured calls, stages, feedback modes, judge
    config.py       the run configuration (pydantic), loaded from YAML and from run.json
    engines/        teacher engines and their registry of kinds
    records/        record models, stage names, counters, the commit protocol, the plan
    cluster.py      joining Ray: the one ray.init of every command
    storage.py      file I/O on any fsspec URI
    secrets.py      credentials masked, by name and by shape, wherever anything is written
    errors.py       errors a user can fix
"""
