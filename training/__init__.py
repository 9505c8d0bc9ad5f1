"""GPTHF models and everything that trains, evaluates and serves them.

Sub-packages, from the bottom up (each imports only those above it in this list):

* ``model``: config, attention patterns, blocks, FLOPs (imports only torch);
* ``export``: the consolidated fp32 export format (weights + config + tokenizer);
* ``data``: data order, shard reads, collate;
* ``generation``: cached decoding and text generation from an export;
* ``eval``: scoring, the Ray Data evaluation job, the report;
* ``train``: config, driver, worker, optimizer, checkpoints.
"""
