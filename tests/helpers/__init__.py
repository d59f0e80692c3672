"""Helpers shared by the test packages, one module each (model: hivemind's ``tests/test_utils``):

- ``swarms``          real local swarms (``SwarmHarness``) and waits on their children's typed events
- ``worker_rpc``      a live worker found in the DHT and sent valid inputs or raw protobuf messages
- ``clock``           ``ManualClock``, time a test moves by hand
- ``polling``         ``wait_until``, for a state no event announces (a file, a DHT record)
- ``chromium``        a page's DOM and a screenshot from headless Chromium
- ``fake_whoami``     Hugging Face's whoami on 127.0.0.1
- ``admitted_peers``  peers of a run as a coordinator admits them, without the coordinator
- ``refusing_worker`` a dishonest worker process
- ``dishonest_participant`` an admitted participant's node that forges, uploads junk and opens many downloads
- ``standin_device``  a second device on a CPU-only machine
- ``throttled_proxy`` a TCP proxy with a home link's upload rate
"""
