"""P-Tuning v2 on a BERT classifier: a prefix at every layer of a frozen encoder plus its classification head, trained
with transformers' Trainer, saved, and reloaded onto a fresh copy of the base model.

    python examples/ptuning_v2_classifier.py [--out DIR] [--epochs 12]

A tiny BERT built from a config (no downloads, random weights) stays frozen; a prefix at every layer plus the head
(``modules_to_save=["classifier"]``) learn a toy task on top of it: whether the marker token appears in the
sequence more often than its rival (the majority class is about 60%).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prefix_attn  # noqa: E402

VOCAB, LENGTH, MARK, RIVAL = 40, 12, 5, 6


class ToyTask(torch.utils.data.Dataset):
    """Sequences of random tokens; label 1 when MARK appears more often than RIVAL."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.labels = ((self.ids == MARK).sum(1) > (self.ids == RIVAL).sum(1)).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=torch.ones_like(data.ids)).logits
    return (logits.argmax(-1) == data.labels).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where to save the trained prefix (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prefix", type=int, default=8, help="virtual tokens per layer")
    args = parser.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = transformers.BertForSequenceClassification(cfg)
    train, test = ToyTask(512, seed=1), ToyTask(256, seed=2)
    out = args.out or tempfile.mkdtemp()
    training = transformers.TrainingArguments(output_dir=os.path.join(out, "trainer"), num_train_epochs=args.epochs,
                                              per_device_train_batch_size=32, learning_rate=5e-2, report_to=[],
                                              save_strategy="no", logging_steps=50, use_cpu=True, seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = prefix_attn.enable(base, prefix_attn.PrefixTuning(base.config, args.prefix),
                               modules_to_save=["classifier"])
    model.print_trainable_parameters()
    print(f"before training: test accuracy {accuracy(model, test):.2f}")
    transformers.Trainer(model=model, args=training, train_dataset=train).train()
    trained = accuracy(model, test)
    print(f"after training: test accuracy {trained:.2f}")
    model.save_pretrained(os.path.join(out, "ptuning_v2"))
    fresh = transformers.BertForSequenceClassification(cfg)
    fresh.load_state_dict(base_state)  # the same stock base, untouched
    restored = prefix_attn.load_pretrained(os.path.join(out, "ptuning_v2"), model=fresh)
    same = accuracy(restored, test)
    print(f"reloaded onto the stock base: test accuracy {same:.2f}"
          f"{' (identical)' if same == trained else ''}")


if __name__ == "__main__":
    main()
