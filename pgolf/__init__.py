"""pgolf: a workbench for the OpenAI Parameter Golf challenge.

Folders follow the pipeline: ``data`` (shards, tokenizer, loaders) -> ``model`` (the GPT and its
techniques) -> ``optim`` (Muon, NorMuon, Adam groups) -> ``train`` (the loop, averaging,
distributed) -> ``quant`` (quantisation, artifact container, codecs) -> ``eval`` (exact val_bpb)
-> ``submit`` (artifact budget, bundle, record folder), with ``config`` composing the typed
per-component configs and ``cli`` the ``pgolf`` command.
"""

__version__ = "0.1.0"
