"""`python3 agora_cli.py export`: the run's model as a standard Hugging Face Llama checkpoint.

Reads one checkpoint per stage, folds the stages (and the subspace codec's reparametrisation) into
one LlamaForCausalLM, and writes it with ``save_pretrained`` (safetensors) beside the run's
tokenizer, so ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``
load the result with nothing of Agora installed.

The checkpoints folder may be a worker's (``server.checkpoint_dir``: ``<run>/<stage>/<peer id>.pt``)
or the coordinator's (``<stage>/<sha256>``); where a stage has several, the one of the highest epoch
is taken.

Examples:
  python3 agora_cli.py export --config llama-8b --checkpoints /srv/agora/checkpoints --out llama-8b-hf
  python3 agora_cli.py export --config local-tiny --checkpoints logs/local/checkpoints --out tiny-hf --dtype float32
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load after parsing: --help stays instant
    from agora.config import RunConfig

_COORDINATOR_FILE = re.compile(r"^[0-9a-f]{64}$")
"""The coordinator stores a stage's checkpoint under its sha256."""


class ExportError(RuntimeError):
    """The export cannot proceed; the message says what is missing and where it was looked for."""


@dataclasses.dataclass(frozen=True)
class StageSource:
    stage: str
    path: Path
    epoch: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agora_cli.py export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config: a shipped name or a YAML path")
    parser.add_argument("--checkpoints", required=True, type=Path, help="folder with the stages' checkpoints (a worker's or the coordinator's)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the Hugging Face checkpoint and tokenizer to")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="precision of the saved weights (default: the run's compute precision, server.precision.dtype)")
    return parser


def candidate_files(checkpoints: Path, run: str, stage: str) -> list[Path]:
    """Every file that may hold ``stage``'s state, in either folder layout."""
    found = sorted((checkpoints / run / stage).glob("*.pt")) + sorted((checkpoints / stage).glob("*.pt"))
    coordinator = checkpoints / stage
    if coordinator.is_dir():
        found += sorted(p for p in coordinator.iterdir() if _COORDINATOR_FILE.match(p.name))
    return found


def newest_stage_states(config: RunConfig, checkpoints: Path) -> tuple[list[StageSource], dict]:
    """The highest-epoch readable checkpoint of every stage, and the union of their weights."""
    from agora_server.server.checkpoint import CheckpointError, read_checkpoint

    sources, model_state = [], {}
    for spec in config.stages:
        best = None
        for path in candidate_files(checkpoints, config.run_name, spec.name):
            try:
                loaded = read_checkpoint(path, mmap=True)
            except CheckpointError:
                continue  # another file of the stage may be good; none at all is reported below
            if loaded and (best is None or loaded.state["epoch"] > best.state["epoch"]):
                best = loaded
        if best is None:
            raise ExportError(f"no readable checkpoint of stage {spec.name} in {checkpoints} (looked in "
                              f"{checkpoints / config.run_name / spec.name} and {checkpoints / spec.name})")
        sources.append(StageSource(spec.name, best.path, int(best.state["epoch"])))
        model_state.update(best.state["model"])
    return sources, model_state


def export(config: RunConfig, checkpoints: Path, out: Path, dtype_name: str) -> list[StageSource]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from agora_server.data.tokenizer import EOS_CANDIDATES, eos_token_id, load_tokenizer
    from agora_server.models.hf_llama import fold_into_llama
    from agora_server.models.precision import COMPUTE_DTYPES

    sources, model_state = newest_stage_states(config, checkpoints)
    dtype = COMPUTE_DTYPES[dtype_name]
    folded = fold_into_llama(config.model, config.stages, config.boundary, config.seed, model_state, dtype)
    tokenizer = load_tokenizer(config.data.tokenizer)
    eos_id = eos_token_id(tokenizer)
    llama_config = LlamaConfig(**folded.config, bos_token_id=eos_id, eos_token_id=eos_id, dtype=dtype_name)
    # built without memory, then given the folded tensors themselves: an 8B model is never held twice
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config)
    model.load_state_dict(folded.state, strict=True, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    eos = next(token for token in EOS_CANDIDATES if tokenizer.token_to_id(token) == eos_id)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos).save_pretrained(out)
    return sources


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from agora.config import ConfigError, load_run_config

    try:
        config = load_run_config(args.config)
    except ConfigError as e:
        print(f"[EXPORT] {e}", file=sys.stderr)
        return 2
    dtype = args.dtype or config.server.precision.dtype
    try:
        sources = export(config, args.checkpoints, args.out, dtype)
    except (ExportError, KeyError) as e:
        print(f"[EXPORT] {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    for source in sources:
        print(f"[EXPORT] {source.stage}: epoch {source.epoch} from {source.path}")
    print(f"[EXPORT] Wrote a Llama checkpoint ({dtype}) and its tokenizer to {args.out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0
