"""How a peer joins a run and stays in it (the coordinator's side is ``agora.coordinator``; the
requests and answers between them are ``agora.protocol``).

- ``join.py``          join(role, …): a worker's join (port test, queue, weights downloaded while queued)
                       or a trainer's access, returning the Membership (session, DHT validator, weights)
- ``client.py``        CoordinatorClient: the coordinator's API as typed calls; AdmissionError and kin
- ``session.py``       CoordinatorSession: heartbeats, a trainer's reports, access renewals, the stop when access ends
- ``checkpoint_upload.py``   CheckpointUploader: a worker's checkpoints to the coordinator, on a thread of its own
- ``checkpoint_download.py`` download_checkpoint: a stage's state over HTTP, resumable, checked by sha256
- ``access.py``        access_for, run_record_validator: the peer's PeerAccess and the run's DHT record validator
- ``port_test.py``     PortTestListener: answers the coordinator's port test while the peer joins
- ``identity.py``      the peer's persistent key file (0600)
- ``code_version.py``  the hash the coordinator checks to refuse modified or stale installations
"""
