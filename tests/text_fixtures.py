"""Tiny texts and in-memory tokenizers for the text tests (no files, no network)."""

from __future__ import annotations

from typing import List, Tuple

TOPICS = {
    0: ["the cat sat on the mat", "a dog ran in the park", "my cat likes warm milk", "the dog barks at night",
        "cats and dogs sleep a lot", "a small cat hides", "the old dog sleeps", "a cat chased the mouse away",
        "dogs love long walks in the park every day", "the cat"],
    1: ["the stock market fell today", "bank rates rise again", "investors sold their shares",
        "the market closed higher", "money flows into bonds", "a bank loan for the house", "shares fell",
        "the central bank raised rates to fight inflation this year", "bonds and stocks", "markets"],
    2: ["rain is expected tomorrow", "a sunny day at the beach", "snow fell over the hills", "the storm passed",
        "cold wind and heavy rain", "a warm sunny morning", "clouds", "the weather stays dry and sunny all week long",
        "fog in the valley", "thunder and rain tonight"],
}


def texts_and_labels() -> Tuple[List[str], List[int]]:
    texts, labels = [], []
    for label, items in TOPICS.items():
        texts += items
        labels += [label] * len(items)
    return texts, labels


def word_tokenizer(texts: List[str], lowercase: bool = True, extra: List[str] = ()):
    """A word-level fast tokenizer over the words of ``texts``: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in (t.lower() if lowercase else t).split()} | set(extra))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
