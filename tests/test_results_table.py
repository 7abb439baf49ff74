"""benchmarks/results_table.py: the docs tables are built from the committed records, cell by cell."""

from __future__ import annotations

from conftest import load_benchmark


def _record(granularity, acc, ppl, **extra):
    return {
        "args": {"granularity": granularity, "peer": None, "adapter": None},
        "accuracy": {"longeval": {"2048": acc}},
        "n_per_length": {"longeval": {"2048": 40}},
        "ppl": ppl,
        "ppl_ood": ppl / 2,
        **extra,
    }


def _results_table():
    return load_benchmark("results_table")


def test_table_cells_come_from_the_records():
    results_table = _results_table()
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
    results_table = _results_table()
    default = _record("channel", 0.8, 20.0)
    default["args"]["prompt_format"] = "longeval"
    chat = _record("channel", 0.8, 20.0)
    chat["args"]["prompt_format"] = "chat"
    base = _record("none", 0.0, 20.0)
    base["args"]["prompt_format"] = "chat"  # base is not trained: its format says nothing
    names = [line.split(" | ")[0] for line in results_table.table([base, default, chat]).splitlines()[2:]]
    assert names == ["| base", "| SEAL-C", "| SEAL-C (chat-format training)"]


def test_rows_name_training_lengths_and_kl_and_survive_missing_perplexities():
    results_table = _results_table()
    base = _record("none", 0.0, 20.0)
    del base["ppl_ood"]  # a base run with --ood-ppl-tokens 0
    long = _record("channel", 0.8, 20.0)
    long["args"]["train_length"] = "4096,6144"
    kl = _record("head", 0.5, 21.0)
    kl["args"].update(train_length="2048", lm_kl=1.0)
    lines = results_table.table([base, long, kl]).splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == [
        "| base",
        "| SEAL-C (trained at 4096,6144)",
        "| SEAL-H (KL-to-base windows x1)",
    ]
    assert lines[0].endswith("| 20.00 (+0.0 %) | – |") and lines[2].endswith("| 21.00 (+5.0 %) | 10.50 |")


def test_columns_no_record_measured_are_left_out():
    results_table = _results_table()
    a = _record("none", 0.0, 20.0)
    a["accuracy"]["chat_prefill"] = {"1024": 0.5}
    a["n_per_length"]["chat_prefill"] = {"1024": 20}
    b = _record("channel", 0.8, 20.0)
    b["accuracy"]["longeval"]["8192"], b["n_per_length"]["longeval"]["8192"] = 0.4, 20
    head = results_table.table([a, b]).splitlines()[0]
    assert head == (
        "| variant | trainable | train s | longeval 2K | longeval 8K | chat_prefill 1K | essay ppl | Python-docs ppl |"
    )
