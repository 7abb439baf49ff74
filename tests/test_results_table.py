"""benchmarks/results_table.py: the docs tables are built from the committed records, cell by cell."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(granularity, acc, ppl, **extra):
    return {
        "args": {"granularity": granularity, "peer": None, "adapter": None},
        "accuracy": {"longeval": {"2048": acc}},
        "n_per_length": {"longeval": {"2048": 40}},
        "ppl": ppl,
        "ppl_ood": ppl / 2,
        **extra,
    }


def test_table_cells_come_from_the_records():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import results_table
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    text = results_table.table(
        [
            _record("none", 0.025, 20.0),
            _record("channel", 0.925, 20.4, trainable_parameters=17280, train_seconds=300.0),
        ]
    )
    lines = text.splitlines()
    assert lines[0] == "| variant | trainable | train s | longeval 2K | essay ppl | Python-docs ppl |"
    assert lines[2] == "| base | 0 | – | 0.025 (1/40) | 20.00 (+0.0 %) | 10.00 (+0.0 %) |"
    assert lines[3] == "| SEAL-C | 17,280 | 300.0 | 0.925 (37/40) | 20.40 (+2.0 %) | 10.20 (+2.0 %) |"


def test_rows_name_a_training_format_other_than_longeval():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import results_table
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    default = _record("channel", 0.8, 20.0)
    default["args"]["prompt_format"] = "longeval"
    chat = _record("channel", 0.8, 20.0)
    chat["args"]["prompt_format"] = "chat"
    base = _record("none", 0.0, 20.0)
    base["args"]["prompt_format"] = "chat"  # base is not trained: its format says nothing
    names = [line.split(" | ")[0] for line in results_table.table([base, default, chat]).splitlines()[2:]]
    assert names == ["| base", "| SEAL-C", "| SEAL-C (chat-format training)"]
