"""``agora_cli.py`` after bootstrap.

- ``main.py``  argument parsing and dispatch: ``--local`` (a swarm on this machine), ``test``
"""
