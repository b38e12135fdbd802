"""A small byte-level BPE tokenizer trained on a synthetic world's corpus.

Byte-level BPE (GPT-2 style, no prefix space) with ``<pad>``, ``<bos>`` and ``<eos>`` specials and a
post-processor that prepends ``<bos>``. Offsets are kept untrimmed, so a word's token span includes
its leading space; ``ckl_toolkit.core.text.object_target_mask`` still marks exactly the object's tokens,
because the token before the object ends before the object's first character.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def _processor(tok: Tokenizer) -> processors.PostProcessor:
    bos_id = tok.token_to_id(BOS)
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer.

    Args:
        texts: the training corpus, one document per item.
        vocab_size: the final vocabulary size, specials and the 256 byte symbols included.
        out_dir: if given, ``save_pretrained`` there, so ``AutoTokenizer.from_pretrained`` loads it.

    Returns:
        A fast tokenizer whose calls prepend ``<bos>``; padding uses ``<pad>``.

    Raises:
        ValueError: if ``vocab_size`` cannot hold the specials and the byte alphabet.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {len(alphabet) + 3} (256 bytes + 3 specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = _processor(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast
