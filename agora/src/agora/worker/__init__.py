"""The worker: one training server per GPU, hosting one pipeline stage.

- ``run.py``     run_worker: options → run config, membership (when coordinated), DHT, StageWorker, until a signal
- ``status.py``  the worker's state in a JSON file beside its log, for `agora_cli.py status`

Its entry point is ``agora/src/agora/run_server.py``, the path the participant guide names; the stage
itself (model, optimizer, averaging, request handling) is ``agora_server.server.StageWorker``.
"""
