"""Local development services and tools for the demo and the tests, apart from what a workbench user imports.

:mod:`~detox_sft_dev.s3` (a SeaweedFS S3 server), :mod:`~detox_sft_dev.model_server` (the caikit runtime on
127.0.0.1, standing in for the cluster's InferenceService), :mod:`~detox_sft_dev.demo` (the four notebooks headless),
:mod:`~detox_sft_dev.rehearsal` (notebooks on the full-size rehearsal recipe, timed) and :mod:`~detox_sft_dev.slides`
(the deck renderer).
"""
