"""The coordinator: one HTTP service per run that admits nodes, assigns stages and signs access.

- ``config.py``      CoordinatorConfig (YAML → typed settings), load_coordinator_config
- ``stages.py``      StagePlan: the run config's stages in pipeline order with the workers each needs; a
                     coordinator config whose stage list disagrees with the run config is refused at start
- ``db.py``          SQLAlchemy models (User, IdentityBinding, QueueRequest, ActiveNode, TrainerShard, Contribution,
                     NodeState, NodeTransition, StageSample, TrainingPoint), Database
- ``tokens.py``      TokenVerifier protocol; HuggingFaceVerifier, TokenFileVerifier, CachingVerifier, add_token
- ``signing.py``     the coordinator's Ed25519 key (0600) and AccessSigner
- ``queue.py``       QueueStatus, DropReason; capacity, admissions, wait estimate (from observed departures), poll interval
- ``node_states.py`` each node's state for the dashboard (queued … training, lapsed, gone) and its changes
- ``assignment.py``  choose_stage (least filled, with hysteresis), choose_move (refill an empty stage)
- ``porttest.py``    probe: is the joining peer's port-test listener reachable on the port it announced?
- ``errors.py``      Refusal: every refusal's HTTP status and message (the guide's strings)
- ``service.py``     Coordinator: the rules as one object for the routes, composed of the parts below
- ``ledger.py``      Ledger: the database under one lock, one transaction per state change
- ``callers.py``     Callers: a participant's token → username; operators
- ``grants.py``      AccessGrants: signed worker and trainer access; check_public_key
- ``roster.py``      Roster: places in the run and the queue (expiry, drops, admissions, stage choice, wait)
- ``trainer_shards.py`` TrainerShards: each trainer identity's shard of the data, kept across restarts
- ``admission.py``   Admission: join (rules, port test, queue place) and a queued node's polls
- ``node_sessions.py`` NodeSessions: renewals, signed heartbeats, operator stops, moves to an emptied stage
- ``checkpoint_access.py`` CheckpointAccess: who may upload or download a stage's checkpoint
- ``reports.py``     Reports, RunTotals: run info, dashboard data, totals, contributions, trainers' reports
- ``contributions.py`` how much of a heartbeat's reported work is credited: bounded by elapsed time, saturating
- ``checkpoints.py`` CheckpointStore: each stage's latest checkpoint on disk, atomic uploads named by sha256
- ``partial_uploads.py`` PartialUploads: resumable uploads' parts on disk and their running sha256, one per node
- ``checkpoint_check.py`` check_stage_state: an upload is a safe-loading, finite state with the stage's layout
- ``body_limit.py``  BodyLimit: the request body limit, counted while the body streams in
- ``history.py``     the dashboard's data: workers per stage sampled over time, trainers' reports, the node list
- ``metrics.py``     CoordinatorMetrics: the Prometheus registry behind ``/metrics``
- ``dashboard.html`` the self-contained live dashboard page served at ``/`` (inline-SVG charts, per-node view)
- ``app.py``         create_app(config): the FastAPI routes

The request and answer bodies of the HTTP API are ``agora.protocol``, shared with the peers; the
peers' side (join, session, checkpoint download) is ``agora.membership``.

The access-token format itself lives in ``agora_server.access`` because every worker checks tokens.
"""
