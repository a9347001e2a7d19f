"""The tutorial's development side, beside the helper package a workbench user imports (``detox_sft``).

:mod:`~detox_sft_dev.zoo` (the offline models and corpora, built by code; ``zoo:<name>`` references reach it through
the entry point ``zoo`` of the group ``detox_sft.refs``), :mod:`~detox_sft_dev.s3` (a SeaweedFS S3 server),
:mod:`~detox_sft_dev.model_server` (the caikit runtime on 127.0.0.1, standing in for the cluster's InferenceService),
:mod:`~detox_sft_dev.demo` (the four notebooks headless), :mod:`~detox_sft_dev.rehearsal` (the notebooks on the
full-size rehearsal recipe, timed) and :mod:`~detox_sft_dev.slides` (the deck, a notebook rendered with nbconvert);
:mod:`~detox_sft_dev.cli` is the ``detox-sft-dev`` command over them. ``detox_sft`` never imports this package.
"""
