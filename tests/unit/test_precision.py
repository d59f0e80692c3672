"""The precision policy through the worker's own code (StageBackend): bfloat16 trains like float32 on
the same batches, offloaded master weights change nothing, a backward that runs out of memory leaves
nothing behind, and the memory savings (checkpointing, chunked loss, fused attention, the fixed
embedding built in blocks) compute exactly what the plain path computes."""

from __future__ import annotations

import pytest
import torch

from agora_server.models import BoundaryConfig, DecoderLM, ModelConfig, PipelineStage, PrecisionConfig, build_boundary_codec, split_into_stages
from agora_server.models.llama import causal_attention
from agora_server.models.memory import ActivationMeter
from agora_server.models.stages import per_token_cross_entropy
from agora_server.models.subspace import fixed_token_embedding
from agora_server.optim import OptimizerConfig
from agora_server.server import ServerConfig, StageBackend
from agora_server.server.backend import MicroBatchOutOfMemory

MODEL = ModelConfig(vocab_size=96, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=32)
SEED = 5
BATCH, SEQ = 4, 32


def backends(precision: PrecisionConfig, boundary=BoundaryConfig(), target_batch=BATCH) -> list[StageBackend]:
    server = ServerConfig(target_batch_size=target_batch, precision=precision, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5, weight_decay=0.01))
    codec = build_boundary_codec(boundary, MODEL, SEED)
    return [
        StageBackend(PipelineStage(MODEL, spec, codec, SEED, precision), server, torch.device("cpu"))
        for spec in split_into_stages(MODEL.num_layers, [2, 2])
    ]


def patterned_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences a model can learn: mostly the next token is (5·previous + 1) mod 48, sometimes random."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, 48, (BATCH,), generator=gen)
    for t in range(SEQ):
        follows = torch.rand(BATCH, generator=gen) < 0.7
        tokens[:, t + 1] = torch.where(follows, (5 * tokens[:, t] + 1) % 48, torch.randint(0, 48, (BATCH,), generator=gen))
    return tokens[:, :-1], tokens[:, 1:]


def micro_batch(head: StageBackend, tail: StageBackend, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """One micro-batch as the trainer runs it over the two workers' RPC entry points."""
    (boundary,) = head.forward({"tokens": tokens})
    weights = torch.full(labels.shape, 1.0 / labels.numel())
    grad, losses = tail.backward({"tokens": tokens, "boundary": boundary, "labels": labels, "loss_weights": weights})
    head.backward({"tokens": tokens, "grad": grad})
    return float(losses.float().mean())


def evaluate(head: StageBackend, tail: StageBackend) -> float:
    losses = []
    for step in range(4):
        tokens, labels = patterned_batch(-1 - step)
        (boundary,) = head.forward({"tokens": tokens})
        (loss,) = tail.forward({"tokens": tokens, "boundary": boundary, "labels": labels})
        losses.append(float(loss.float().mean()))
    return sum(losses) / len(losses)


def train(precision: PrecisionConfig, steps: int) -> tuple[list[StageBackend], float]:
    head, tail = backends(precision)
    for step in range(steps):
        micro_batch(head, tail, *patterned_batch(step))
    return [head, tail], evaluate(head, tail)


def test_bfloat16_trains_like_float32_on_the_same_batches():
    start = evaluate(*backends(PrecisionConfig()))
    _, fp32 = train(PrecisionConfig(), 150)
    _, bf16 = train(PrecisionConfig(dtype="bfloat16", activation_checkpointing=True, loss_chunk_tokens=48), 150)
    assert fp32 < start - 1.5, f"the model must really learn ({start:.3f} → {fp32:.3f})"
    assert abs(bf16 - fp32) <= 0.01 * fp32, f"bf16 {bf16:.4f} vs fp32 {fp32:.4f}"


def test_bfloat16_weights_train_from_float32_masters():
    (head, _), _ = train(PrecisionConfig(dtype="bfloat16"), 6)
    weights = head.weights
    assert all(p.dtype == torch.bfloat16 for p in weights.params)
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(weights.masters, weights.params))
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(weights.params, weights.masters)), "weights are the rounded masters"
    state = head.state_dict()["model"]
    assert all(t.dtype == torch.float32 for t in state.values()), "checkpoints keep the float32 masters"


def test_offloaded_master_weights_train_exactly_like_weights_that_are_their_own_masters():
    (head, tail), _ = train(PrecisionConfig(), 10)
    (head_offloaded, tail_offloaded), _ = train(PrecisionConfig(master_weights="cpu"), 10)
    weights = head_offloaded.weights
    assert all(m.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for m, p in zip(weights.masters, weights.params))
    for a, b in zip([*head.stage.parameters(), *tail.stage.parameters()], [*head_offloaded.stage.parameters(), *tail_offloaded.stage.parameters()]):
        assert torch.equal(a, b)


def test_out_of_memory_mid_backward_drops_the_micro_batch_and_keeps_serving():
    healthy_head, healthy_tail = backends(PrecisionConfig(), target_batch=3 * BATCH)
    head, tail = backends(PrecisionConfig(), target_batch=3 * BATCH)
    first, second = patterned_batch(0), patterned_batch(1)
    for pair in ((healthy_head, healthy_tail), (head, tail)):
        micro_batch(*pair, *first)
    sums_before = [s.clone() for s in tail.weights.sums]

    def run_out_of_memory(module, grad_input, grad_output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # the backward gets through the tail's last layer (its gradients exist) before the first one fails
    hook = tail.stage.layers["2"].register_full_backward_hook(run_out_of_memory)
    with pytest.raises(MicroBatchOutOfMemory, match="^CUDA out of memory"):
        micro_batch(head, tail, *second)
    hook.remove()
    assert all(p.grad is None for p in tail.weights.params), "no partial gradient is left on the weights"
    assert all(torch.equal(a, b) for a, b in zip(tail.weights.sums, sums_before)), "nothing of it reached the sums"
    assert tail.weights.batches == 1 and tail.snapshot().backward_batches == 1

    # the worker goes on: the next micro-batches give what a worker that never failed gives
    for step in (2, 3):
        for pair in ((healthy_head, healthy_tail), (head, tail)):
            micro_batch(*pair, *patterned_batch(step))
    assert tail.snapshot().optimizer_steps == healthy_tail.snapshot().optimizer_steps == 1
    for a, b in zip(tail.stage.parameters(), healthy_tail.stage.parameters()):
        assert torch.equal(a, b)


def test_checkpointed_layers_and_chunked_loss_give_the_same_loss_and_gradients():
    tokens, labels = patterned_batch(0)
    results = []
    for precision in (PrecisionConfig(), PrecisionConfig(activation_checkpointing=True, loss_chunk_tokens=40)):
        model = DecoderLM(MODEL, SEED, precision)
        loss = model(tokens, labels)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (saving_loss, saving_grads) = results
    assert torch.allclose(plain_loss, saving_loss, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, saving_grads[name], rtol=1e-5, atol=1e-7), name


def test_the_chunked_loss_never_holds_the_logits_of_the_whole_micro_batch():
    vocab, tokens = 4096, 2048
    hidden = torch.randn(1, tokens, 64, requires_grad=True)
    head = torch.nn.Linear(64, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, tokens))
    whole_logits = tokens * vocab * 4
    with ActivationMeter() as meter:
        per_token_cross_entropy(hidden, head, labels, chunk_tokens=256).sum().backward()
    assert meter.peak([head.weight.grad, hidden.grad]) < whole_logits / 2


def test_attention_never_builds_the_score_matrix():
    heads, kv_heads, seq, dim = 4, 2, 2048, 16
    q = torch.randn(1, heads, seq, dim, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, dim, requires_grad=True) for _ in range(2))
    with ActivationMeter() as meter:
        causal_attention(q, k, v).sum().backward()
    assert meter.peak([q.grad, k.grad, v.grad]) < seq * seq * 4, "less than one head's T x T float32 scores"
    expanded = [t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v)]
    reference = torch.nn.functional.scaled_dot_product_attention(q, *expanded, is_causal=True)
    assert torch.allclose(causal_attention(q, k, v), reference, atol=1e-6)


def test_the_fixed_embedding_is_bfloat16_built_in_blocks_and_the_same_everywhere():
    config = ModelConfig(vocab_size=40_000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    with ActivationMeter() as meter:
        table = fixed_token_embedding(config, SEED, torch.device("cpu"))
    assert table.dtype == torch.bfloat16 and table.shape == (40_000, 64)
    float32_table = 40_000 * 64 * 4
    assert meter.peak() < table.nbytes + float32_table / 2, "never a float32 copy of the whole table, only blocks of rows"
    assert torch.equal(table, fixed_token_embedding(config, SEED, torch.device("cpu")))
    assert fixed_token_embedding(config, SEED, torch.device("meta")).is_meta
    assert 0.015 < float(table.float().std()) < 0.025, "scaled by init_std"


def test_a_stage_is_built_only_once_auto_checkpointing_is_decided():
    auto = PrecisionConfig(activation_checkpointing="auto")
    with pytest.raises(ValueError, match="must be decided"):
        PipelineStage(MODEL, split_into_stages(MODEL.num_layers, [2, 2])[0], build_boundary_codec(BoundaryConfig(), MODEL, SEED), SEED, auto)
