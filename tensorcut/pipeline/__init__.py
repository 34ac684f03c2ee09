"""The verbs on checkpoints, as functions: compress / fine-tune / export a checkpoint
(:mod:`~tensorcut.pipeline.workflow`), the whole job to a goal as resumable stages
(:mod:`~tensorcut.pipeline.run`), its HTML report (:mod:`~tensorcut.pipeline.report`) and the
demo (:mod:`~tensorcut.pipeline.demo`). The CLI (:mod:`tensorcut.cli`) is a thin layer over
these; nothing here imports it."""
