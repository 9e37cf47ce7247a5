"""The model store: the only thing the pipeline and the service share, defined once, here.

Layout of ``MODELS_DIR`` (``layout``)::

    manifest.json                   signed: per model the promoted version, its promotion
                                    history and the held-back candidates; the best model; a
                                    sequence number that only grows
    <model>/<version>/model.pkl     the fitted scikit-learn Pipeline (pickle protocol 5)
    <model>/<version>/metadata.json signed: the pickle's sha256 and size, classes, features,
                                    held-out metrics, the gate's decision, run id, versions

A version id is the UTC time of its export (``20261202T041500.123456Z``), so ids sort by time.
A version is written into a dot-named folder and renamed into place in one step, and never
changed afterwards; promotion, rollback and pruning change only the manifest (``writer``), so a
reader (``reader``) sees the old state or the new one, never half of either.

Both documents are signed with Ed25519 (``signing``): the pipeline holds the private key, the
service only the public key, and it verifies every document before it reads a pickle.
"""
