"""Write a small text classification set, two tokenizers trained on it, and tiny BERT configs for a teacher and a
student: everything recipes/text-example.yaml needs, with no network.

    python recipes/examples/make_text.py DIR [--per-class N] [--seed S]

DIR/train.csv and DIR/test.csv (columns text, label): four topics (sports, weather, food, music). Each sentence
mixes words of its own topic with words of one other topic and with filler, so the classes need the words and
their Bayes class probabilities are not one-hot (some sentences are truly ambiguous). DIR/teacher-bert/ and
DIR/student-bert/: a BERT config (2 layers of width 64; 1 layer of width 32) and a WordPiece tokenizer learned
from the training texts (`wordpiece_vocab`; at most 400 and 110 tokens: the teacher's holds every word, the
student's the most frequent words and every character, reading the others in pieces, so teacher and student
tokenise differently). Seeded: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

TOPICS = {
    "sports": "goal match team score striker keeper league coach referee season penalty stadium win".split(),
    "weather": "rain storm cloud sunny forecast wind snow thunder humid cold breeze frost drizzle".split(),
    "food": "bread soup spicy recipe oven cheese dinner salad bake flavor garlic pasta dessert".split(),
    "music": "guitar song album drummer concert melody chorus singer rhythm piano tempo band lyric".split(),
}
FILLER = "the a of and to in on was it this that very quite really some".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(label: int, rng: np.random.Generator) -> str:
    """8-12 words: from the own topic with probability p (drawn per sentence), else from one other topic,
    with filler between."""
    names = list(TOPICS)
    other = names[(label + 1 + rng.integers(len(names) - 1)) % len(names)]
    own_share = rng.uniform(0.45, 0.95)
    words = []
    for _ in range(rng.integers(8, 13)):
        if rng.random() < 0.3:
            words.append(rng.choice(FILLER))
        else:
            topic = names[label] if rng.random() < own_share else other
            words.append(rng.choice(TOPICS[topic]))
    return " ".join(words)


def write_split(path: Path, per_class: int, rng: np.random.Generator) -> list[str]:
    rows = [(sentence(label, rng), name) for label, name in enumerate(TOPICS) for _ in range(per_class)]
    order = rng.permutation(len(rows))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows[i] for i in order)
    return [text for text, _ in rows]


def wordpiece_vocab(texts: list[str], size: int) -> dict[str, int]:
    """A WordPiece vocabulary learned from the texts' word counts: the special tokens, every character alone and as
    a continuation (##c), then whole words, most frequent first (ties alphabetical), up to `size` tokens; a word
    left out is read in pieces. The same texts give the same vocabulary (the tokenizers library's WordPieceTrainer
    breaks ties between equal pair counts in hash order, which differs from run to run)."""
    counts = Counter(word for text in texts for word in text.lower().split())
    chars = sorted({c for word in counts for c in word})
    vocab = [*SPECIALS, *chars, *(f"##{c}" for c in chars)]
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in vocab]
    vocab += words[:max(0, size - len(vocab))]
    return {token: i for i, token in enumerate(vocab)}


def write_model(folder: Path, texts: list[str], vocab_size: int, hidden: int, layers: int) -> None:
    """A WordPiece tokenizer learned from `texts` (`wordpiece_vocab`) and a tiny BERT config, as transformers reads
    them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-class", type=int, default=300, help="training sentences per topic (test: a third)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.folder.mkdir(parents=True, exist_ok=True)
    texts = write_split(args.folder / "train.csv", args.per_class, rng)
    write_split(args.folder / "test.csv", max(1, args.per_class // 3), rng)
    write_model(args.folder / "teacher-bert", texts, vocab_size=400, hidden=64, layers=2)
    write_model(args.folder / "student-bert", texts, vocab_size=110, hidden=32, layers=1)
    print(args.folder)


if __name__ == "__main__":
    main()
