"""Agora, the application: picks a combination of agora_server's parts and runs it.

- ``config.py``        RunConfig (YAML → typed objects), load_run_config, ConfigError
- ``configs/``         shipped run configs: local-tiny.yaml (CPU swarm), llama-8b.yaml (production shape)
- ``protocol.py``      the coordinator's requests and answers, shared by the coordinator and the peers
- ``membership/``      how a peer joins a run and stays in it: join, session, checkpoint transfers, identity
- ``processes.py``     logging set-up and signal handling shared by the entry points
- ``run_server.py``    worker entry point at the guide's path (parse → ``worker.run``)
- ``worker/``         the worker: options → membership, DHT, StageWorker; its status file
- ``run_seed.py``      seed entry point: a long-lived DHT peer with a fixed identity
- ``peer_options.py``  each peer flag defined once; WorkerOptions / SeedOptions / TrainerOptions, parsed and written back
- ``trainer/``         trainer entry point: data → PipelineTrainer
- ``local_swarm.py``   starts seed, workers and trainer on 127.0.0.1 and stops them all
- ``cli/``             ``agora_cli.py`` after bootstrap: ``--local``, ``test``, ``memory-plan``, ``export``
"""
