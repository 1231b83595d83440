"""Learning in the background (SPEC §8): features, clustering, drift, embeddings.

Serving imports only `features`, `model`, `drift`, `similarity`, `sampling`, `store` and
`service` (NumPy and safetensors, no scikit-learn, no torch; a test checks it). scikit-learn is
imported by `clustering` and torch by `embeddings`; both run in training processes started by
`service`, never on the event loop that serves RPCs.
"""
