"""Segmenting albums: many photos, one reference, as a resumable batch job above the method (``segmentation``).

* ``run``: the whole job: ``run.json`` settings, resume planning, processes (``accelerate``), the final results.
* ``segment_photos``: the photo loop: batched encoding, decoding, files written in a background thread.
* ``outputs``: the output folder's layout per photo (mask PNGs, overlays, JSON rows) and when a photo is complete.
* ``batch_encoder``: SAM's image encoder on batches, with autocast, prefetching and the embedding cache.
* ``embedding_cache``: image embeddings on disk, keyed by pixels, weights and encoder settings.
* ``sharding``: splitting photos between processes and the JSONL result logs they write.
* ``segment_job``: the ``segment`` command's library side (its config, validation and run).

Import from the submodules; this package file stays light (no torch import).
"""
