"""Training data for Agora: an offline corpus, tokenizers, and packed token batches for the trainer.

- config.py - DataConfig: where text comes from (local corpus or Hugging Face Hub), tokenizer, sequence length,
  validation share, shuffling and cache directory
- corpus.py - ensure_local_corpus: builds and reuses the offline corpus, the Python standard library's own source
  files as JSON lines, split into train and validation by a stable hash of each file's path
- tokenizer.py - load_tokenizer resolves DataConfig.tokenizer (shipped name, local file or Hub id), eos_token_id
  finds the end-of-text token that separates packed documents
- stream.py - open_text_dataset streams the documents of a split; PackedBatches packs them into
  (tokens, labels) batches, sharded by trainer rank, also numbered from any micro-batch (``numbered``);
  validation_batches gives the fixed evaluation set
- position.py - StreamBatch (a micro-batch and its place in the rank's stream), DataPosition (which ones are
  finished), StreamPoint (where the stream can be taken up without tokenizing what came before),
  PositionFile (saved after every finished micro-batch, so a restarted trainer continues)
- retrying.py - RetryingStream reopens a failing data source with backoff and goes past what it handed out
- assets/agora-bpe-8k.json - the shipped byte-level BPE tokenizer (8192 tokens, "<|endoftext|>" is id 0),
  trained on the corpus by scripts/build_tokenizer.py
"""

from .config import DataConfig
from .corpus import default_cache_dir, ensure_local_corpus
from .stream import PackedBatches, open_text_dataset, validation_batches
from .tokenizer import eos_token_id, load_tokenizer, shipped_tokenizers

__all__ = [
    "DataConfig",
    "PackedBatches",
    "default_cache_dir",
    "ensure_local_corpus",
    "eos_token_id",
    "load_tokenizer",
    "open_text_dataset",
    "shipped_tokenizers",
    "validation_batches",
]
