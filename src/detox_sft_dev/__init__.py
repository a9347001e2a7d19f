"""Local development services and tools for the demo and the tests, apart from what a workbench user imports.

:mod:`~detox_sft.dev.s3` (a SeaweedFS S3 server), :mod:`~detox_sft.dev.model_server` (the caikit runtime on
127.0.0.1, standing in for the cluster's InferenceService), :mod:`~detox_sft.dev.demo` (the four notebooks headless),
:mod:`~detox_sft.dev.rehearsal` (notebooks on the full-size rehearsal recipe, timed) and :mod:`~detox_sft.dev.slides`
(the deck renderer).
"""
