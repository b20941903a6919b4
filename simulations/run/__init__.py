"""``fedpersona simulate``, ``sweep``, ``compare`` and ``evaluate``: federated runs on
one machine, their honest baselines, and their plots."""
