"""Every refusal the coordinator can answer, in one table: code, HTTP status, message.

Messages marked (guide) are the participant guide's exact strings; workers print them as they are.
"""

from __future__ import annotations

import enum

from agora_server.caller_text import clip


class Refusal(enum.Enum):
    INVALID_TOKEN = (401, "Invalid HuggingFace token")  # (guide)
    TOKEN_SERVICE_DOWN = (503, "The token could not be checked right now; try again in a minute.")
    TOO_MANY_NEW_TOKENS = (429, "Too many unrecognised tokens from this address; wait a minute, then check that the token is your Hugging Face token.")
    PEER_ID_TAKEN = (403, "This peer_id is already used by another user")  # (guide)
    ALREADY_QUEUED = (409, "This node is already in the authorization queue. Please remove private key from the node and try again.")  # (guide)
    DOWNLOAD_TOO_SLOW = (410, "Download is too slow, please ensure sufficient bandwidth and try again.")  # (guide)
    VERSION_MISMATCH = (403, "Verification failed.")  # (guide)
    PORT_TEST_FAILED = (400, "Port test failed. Make sure your port forwarding is correct")  # (guide)
    TOO_MANY_NODES = (429, "This account already has {count} node(s) active or waiting, the most one account may have. Stop one of them before starting another.")
    KEY_MISMATCH = (400, "public_key does not hash to peer_id: send the public key of the identity that peer_id comes from.")
    BAD_PUBLIC_KEY = (400, "public_key is not a usable libp2p RSA public key: {reason}")
    FOREIGN_ANNOUNCE_IP = (400, "announce_ip {announced} is not the address this request came from ({source}); announce the address the coordinator sees.")
    UNKNOWN_REQUEST = (404, "No queue request with this request_id; join again.")
    WRONG_SESSION = (403, "The session token does not match this queue request.")
    ABANDONED = (410, "This request left the queue after going unpolled for too long; join again.")
    ACCESS_EXPIRED = (410, "This node's access has expired or was withdrawn; join again.")
    NOT_YOUR_NODE = (403, "This peer_id is not registered to this account.")
    NODE_STOPPED = (410, "The run's operators stopped this node: {reason}")
    NO_DATA_SHARD = (409, "All {shards} data shards of this run are held by other trainers (the next one frees up at {free_at}, when its trainer's access lapses). Start a trainer again with its own key to continue its shard, or raise trainer.data_shards in the run config of the coordinator and the trainers to add one.")
    NOT_OPERATOR = (403, "Only the run's operators may stop nodes or run trainers.")
    BAD_SIGNATURE = (401, "Heartbeat signature does not verify with this peer's public key.")
    CLOCK_SKEW = (400, "Heartbeat sent_at is {skew:.0f}s away from the coordinator's clock; check the node's clock.")
    STALE_HEARTBEAT = (409, "Heartbeat is not newer than the last one accepted from this node.")
    NO_ACCESS_TOKEN = (401, "Checkpoint uploads need the node's access token: send 'Authorization: Bearer <access token>'.")
    BAD_ACCESS_TOKEN = (401, "The access token was not accepted: {reason}")
    WRONG_STAGE = (403, "This access token is for stage {token_stage}, not {stage}.")
    ACCESS_WITHDRAWN = (403, "This node no longer holds access to stage {stage}; join again.")
    DOWNLOAD_NEEDS_TOKEN = (401, "Checkpoint downloads need 'Authorization: Bearer <token>': the participant's token of a node queued for or serving the stage, or that node's access token.")
    NOT_ON_STAGE = (403, "Only nodes queued for or serving stage {stage} (and the run's operators) may download its checkpoint.")
    UNKNOWN_STAGE = (404, "This run has no stage named {stage}.")
    CHECKPOINTS_NOT_SERVED = (404, "This coordinator does not keep checkpoints.")
    NO_CHECKPOINT = (404, "No checkpoint has been uploaded for stage {stage} yet.")
    REQUEST_TOO_LARGE = (413, "The request body is larger than the {limit} bytes this coordinator accepts.")
    CHECKPOINT_TOO_LARGE = (413, "The checkpoint is larger than the {limit} bytes this coordinator accepts.")
    INVALID_CHECKPOINT = (400, "The upload is not a valid checkpoint of stage {stage}: {reason}. The stage keeps its current one.")
    EMPTY_CHECKPOINT = (400, "The checkpoint upload is empty.")
    CHECKPOINT_INCOMPLETE = (400, "The upload ended after {received} of the {expected} bytes announced; upload again.")
    UPLOAD_OFFSET_MISMATCH = (409, "This upload has {received} bytes stored here, not {offset}: ask for its status and continue from there.")
    UPLOAD_NEEDS_TOTAL = (400, "A resumable upload (X-Upload-Id) must give the whole file's size in X-Upload-Total.")
    UPLOAD_PAST_END = (400, "The upload sent more than the {total} bytes announced in X-Upload-Total; upload again from the start.")
    UPLOAD_TAKEN_OVER = (409, "A newer request continues this upload; this one stops.")
    CHECKPOINT_MISMATCH = (400, "The uploaded bytes have sha256 {actual}, not the {expected} sent in X-Checkpoint-SHA256; upload again.")

    @property
    def status(self) -> int:
        return self.value[0]


class CoordinatorRefusal(Exception):
    def __init__(self, refusal: Refusal, **details):
        self.refusal = refusal
        # details may come from the caller (a reason, a stage name): clipped before they reach the reply
        details = {key: clip(value) if isinstance(value, str) else value for key, value in details.items()}
        self.message = refusal.value[1].format(**details) if details else refusal.value[1]
        super().__init__(self.message)

    @property
    def code(self) -> str:
        return self.refusal.name.lower()
