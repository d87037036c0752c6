"""The examples run end to end (short runs, in a subprocess as a user would start them)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_prefix_bank_example_runs(tmp_path):
    script = os.path.join(EXAMPLES, "train_prefix_bank.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--pretrain-steps", "150", "--steps", "60",
                          "--min-hits", "5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "reloaded bank: 2 entries (count_up: P=4, count_down: P=8)" in run.stdout
    assert "reloaded generations identical to the trained model's" in run.stdout
    hits = re.search(r"following their task's rule: count_up (\d)/6, count_down (\d)/6", run.stdout)
    assert hits and min(int(h) for h in hits.groups()) >= 5, run.stdout[-3000:]
    saved = tmp_path / "bank_model"
    assert (saved / "model.safetensors").is_file()
    assert sorted(os.listdir(saved / "prefix_bank")) == ["bank.json", "entry_0.safetensors", "entry_1.safetensors"]


@pytest.mark.parametrize("options", [["--hidden"],
                                     ["--attn-pdrop", "0.1", "--pretrain-steps", "150", "--steps", "100"]],
                         ids=["hidden", "attention-dropout"])
def test_gpt2_example_runs(tmp_path, options):
    """The GPT-2 example with a hidden-state prefix (default lengths), and with GPT-2's attention dropout in the
    kernels (a shorter run)."""
    script = os.path.join(EXAMPLES, "train_prefix_gpt2.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path), *options], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    hits = re.search(r"(\d)/4 generations follow rule -2", run.stdout)
    assert hits and int(hits.group(1)) >= 3, run.stdout[-3000:]


def test_ptuning_v2_classifier_example_runs(tmp_path):
    """A prefix plus the head of a frozen BERT learn a toy classification with Trainer, and reload identically."""
    script = os.path.join(EXAMPLES, "ptuning_v2_classifier.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    before = float(re.search(r"before training: test accuracy ([\d.]+)", run.stdout).group(1))
    after = float(re.search(r"after training: test accuracy ([\d.]+)", run.stdout).group(1))
    assert after >= 0.7 and after > before + 0.1, run.stdout[-3000:]
    assert "reloaded onto the stock base" in run.stdout and "(identical)" in run.stdout
    assert (tmp_path / "ptuning_v2" / "prefix.safetensors").is_file()


def test_bart_summariser_example_runs(tmp_path):
    """A prefix on a frozen tiny BART (Li & Liang's layout) learns the toy summary rule, and reloads identically."""
    script = os.path.join(EXAMPLES, "bart_summariser.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    before = float(re.search(r"stock model: summary exact match ([\d.]+)", run.stdout).group(1))
    after = float(re.search(r"summary rule: loss [\d.]+, summary exact match ([\d.]+)", run.stdout).group(1))
    assert after >= 0.6 and after > before + 0.3, run.stdout[-3000:]
    assert "(identical)" in run.stdout
    assert (tmp_path / "summariser" / "prefix.safetensors").is_file()


def test_grpo_grouped_example_runs():
    """GRPO with grouped_forward: its log-probs equal the stock concatenated batch's, and the reward climbs."""
    script = os.path.join(EXAMPLES, "grpo_grouped.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    diff = float(re.search(r"max \|diff\| ([\d.e+-]+)", run.stdout).group(1))
    assert diff < 1e-4, run.stdout
    rewards = [float(r) for r in re.findall(r"mean reward ([\d.]+)", run.stdout)]
    assert len(rewards) == 5 and rewards[-1] >= 0.75 and rewards[-1] > rewards[0] + 0.15, run.stdout
