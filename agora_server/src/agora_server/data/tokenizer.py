"""Loading tokenizers: shipped with the package, from a local file, or from the Hugging Face Hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

# End-of-text markers in order of preference. "<|endoftext|>" (GPT-2 family, Qwen, and the shipped
# tokenizer) comes first because tokenizers that also define a chat-turn terminator use it as the
# document separator.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def shipped_tokenizers() -> list[str]:
    """Names of the tokenizers bundled in ``agora_server/data/assets``."""
    assets = resources.files(__package__) / "assets"
    if not assets.is_dir():
        return []
    return sorted(entry.name.removesuffix(".json") for entry in assets.iterdir() if entry.name.endswith(".json"))


def load_tokenizer(spec: str) -> Tokenizer:
    """Load the tokenizer that ``DataConfig.tokenizer`` names.

    ``spec`` is tried, in order, as a shipped tokenizer name, a path to a ``tokenizer.json`` file,
    and a Hugging Face Hub repo id.
    """
    if spec in shipped_tokenizers():
        # Read through importlib.resources so it also works when the package is zipped.
        return Tokenizer.from_str((resources.files(__package__) / "assets" / f"{spec}.json").read_text("utf-8"))
    path = Path(spec).expanduser()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if spec.endswith(".json") or path.is_absolute() or spec.startswith((".", "~")):
        # Clearly meant as a file: asking the Hub would only hide the typo behind a network error.
        raise FileNotFoundError(
            f"tokenizer file {spec!r} does not exist. Set data.tokenizer to an existing tokenizer.json "
            f"or to a shipped tokenizer ({_shipped_list()})."
        )
    return _load_from_hub(spec)


def _load_from_hub(repo_id: str) -> Tokenizer:
    try:
        # Downloads through huggingface_hub, which picks up $HF_TOKEN or a `huggingface-cli login` by itself.
        return Tokenizer.from_pretrained(repo_id)
    except Exception as e:  # the tokenizers binding raises plain Exception for every Hub failure
        raise ValueError(
            f"could not load tokenizer {repo_id!r}: it is neither a shipped tokenizer ({_shipped_list()}) nor an "
            f"existing file, and loading it from the Hugging Face Hub failed ({e}). Set data.tokenizer to a "
            "shipped name or a local tokenizer.json path, or check the repo id, your network access and, for "
            "gated repos, that you accepted the license and logged in (huggingface-cli login or $HF_TOKEN)."
        ) from e


def _shipped_list() -> str:
    return ", ".join(shipped_tokenizers()) or "none installed"


def eos_token_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token that separates packed documents."""
    for token in EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"the tokenizer has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}, so documents cannot be "
        "separated when packing. Use a tokenizer that defines one, e.g. the shipped 'agora-bpe-8k'."
    )
