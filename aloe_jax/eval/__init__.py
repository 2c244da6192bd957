"""The ALOE benchmark: simulated users chat with the model under test for several turns, a judge scores each reply,
and the scores become AL(k), AVG, improvement rate, N-IR and R² with bootstrap CIs (see metrics.py)."""
