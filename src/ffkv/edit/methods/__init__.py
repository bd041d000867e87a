"""The edit methods, one module each. The registry (:mod:`ffkv.edit.registry`) lists them.

A method module exports

    NAME          the method's name (``ffkv edit --method NAME``)
    SUMMARY       one line for ``--help`` and the docs table
    BATCHED       True when one update serves many requests (MEMIT); False: one request at a time
    HPARAM_DOCS   {hyperparameter: one-line meaning}
    defaults(model) -> dict          the default hyperparameters on this model (a fresh dict)
    layers(hp) -> list[int]          the layers an hparams dict edits (their key statistics are needed)
    apply(model, requests, hp, journal, context) -> None
                                     edit the model through ``journal.record`` (so every update is checked,
                                     undoable and replayable); ``context`` is the :class:`ffkv.edit.context
                                     .EditContext` (statistics, context prefixes, progress)

and keeps its equations in the modules beside it (``edit/rome.py``, ``edit/memit.py``, ...). Adding a method
is one new file here and one line in ``registry.METHODS``.
"""
