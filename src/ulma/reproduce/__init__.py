"""``ulma reproduce``: the paper's Tables 1-3 and Figures 1-2 as a matrix of runs.

- :mod:`~ulma.reproduce.experiments`: the tables (methods x data-set slots), the data sets
  that fill the slots at each scale, and the claims (a)-(e);
- :mod:`~ulma.reproduce.scales`: the ``cpu`` and ``paper`` presets (typed, overridable);
- :mod:`~ulma.reproduce.splits`: the train / test / judge split of a data set, made once;
- :mod:`~ulma.reproduce.context`: what the jobs share (OUT, scale, data sets, the judge);
- :mod:`~ulma.reproduce.configs`: each job's training config, and launching a training;
- :mod:`~ulma.reproduce.jobs`: the jobs (split, judge, RLHF reward model, cells); every job
  writes ``DONE.json`` last, so finished work is skipped on re-run;
- :mod:`~ulma.reproduce.runner`: the plan, its dry-run description, running it;
- :mod:`~ulma.reproduce.claims`: verdicts from confidence intervals;
- :mod:`~ulma.reproduce.summary`: tables, figures and claims from whatever cells exist;
- :mod:`~ulma.reproduce.cli`: the ``ulma reproduce`` command.

Training, evaluation and reporting are the library's own (:func:`ulma.trainer.train`,
:mod:`ulma.evaluation`); this package only decides what to run and where.
"""
