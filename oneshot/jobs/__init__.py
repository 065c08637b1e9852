"""Jobs: the runs that read models and write run folders (`oneshot.jobs.prune`; the evaluation job is
`oneshot.eval.evaluate`). Jobs use the core and the run-folder contract, never the publishing layer: the
CLI hands them the steps that add a card or a report (``finish``)."""
