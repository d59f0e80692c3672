"""Agora's reusable training library.

It knows nothing of run.json, the participant wizard or the coordinator: the ``agora``
application picks a combination of these parts and runs it.

- ``models``     Llama-style stage modules and the stage-boundary codec seam
- ``wire``       tensor layouts of stage RPCs and DHT record types shared by server and pipeline
- ``tensor_stream`` streamed (de)serialisation of RPC tensors with byte and part limits, shared likewise
- ``p2p_frames``  the largest p2p frame a peer reads (install_frame_limit, before any DHT starts)
- ``caller_text`` clip: caller-supplied text, shortened before it reaches a reply or a log line
- ``server``     a stage server on hivemind's p2p layer: validation, backend, DHT announcer
- ``pipeline``   the client side: stage discovery, load balancing, remote calls, micro-batch routing
- ``optim``      optimizers and learning-rate schedules used by stage backends
- ``data``       datasets streaming, tokenizer, sequence packing
- ``telemetry``  typed events and their consumers (console lines, file log)
"""
